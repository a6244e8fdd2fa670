"""Smoke test of ``python -m benchmarks comm`` on tiny sizes (mpirun -n 4): files and keys."""
import json
import os
import tempfile

import pytest

from benchmarks import comm as bench_comm
from hpc_dgrab.errors import UserError


def test_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match="sizes must be >= 1000"):
        bench_comm.main(["--out", "x", "--sizes", "10"])


@pytest.mark.mpi(min_size=2)
def test_comm_bench_writes_json_and_png():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    out = comm.bcast(tempfile.mkdtemp(prefix="bench-comm-") if comm.rank == 0 else None, root=0)
    code = bench_comm.main(["--quick", "--no-horovod", "--sizes", "1000,4000", "--reps", "2", "--out", out])
    ok = True
    if comm.rank == 0:
        with open(os.path.join(out, "comm.json")) as fh:
            result = json.load(fh)
        rows = result["allreduce"]
        ok = (code == 0 and os.path.getsize(os.path.join(out, "comm.png")) > 1000
              and [r["numel"] for r in rows] == [1000, 4000]
              and all(r["allreduce_ratio"] > 0 and r["best_baseline"] in ("raw_in_place", "raw_out_of_place")
                      for r in rows)
              and result["gossip"]["gossip_ratio"] > 0 and result["ranks"] == comm.size
              and [r["k"] for r in result["sparse"]] == [4, 40, 400]
              and [r["sparse_bytes_ratio"] for r in result["sparse"]] == [4 * 8 / 16000, 40 * 8 / 16000,
                                                                         400 * 8 / 16000]
              and result["horovod_skipped"] == "--no-horovod")
    assert all(comm.allgather(ok))
