"""Transports: every one (MPI in each progress mode, Horovod when it imports, torch.distributed over
gloo; a new transport adds one entry to ``TRANSPORTS``) gives the exact sums and gathers;
MPITransport's threads and communicators end with it, ``hpc_dgrab.shutdown()`` closes every live
one. mpirun -n 2 and -n 4.

Every rank computes, the outcomes are gathered, and every rank asserts (no assert before a
collective the others wait in).
"""
import gc
import threading

import numpy as np
import pytest
import torch

from hpc_dgrab.comm import get_transport, horovod_available
from hpc_dgrab.comm.mpi import CHUNK_BYTES, PROGRESS, MPITransport
from hpc_dgrab.comm.transport import Collectives, PointToPoint, Transport

#: name -> (get_transport name, options); every Collectives implementation the tests run over
TRANSPORTS = {f"mpi-{p}": ("mpi", {"progress": p}) for p in PROGRESS}
TRANSPORTS["horovod"] = ("horovod", {})
TRANSPORTS["gloo"] = ("gloo", {})


def _make(name):
    kind, options = TRANSPORTS[name]
    if kind == "horovod" and not horovod_available():
        pytest.skip("horovod.torch does not import here (build it: make horovod)")
    return get_transport(kind, _world(), **options)


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _all_true(flag):
    return all(_world().allgather(bool(flag)))


def _threads():
    return sum(1 for t in threading.enumerate() if t.name == "hpc_dgrab-allreduce")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", TRANSPORTS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64])
def test_each_transport_gives_the_exact_sum(name, dtype):
    comm = _world()
    n, r = comm.size, comm.rank
    t = _make(name)
    x = (torch.arange(1000, dtype=torch.int64) * (r + 1) + r).to(dtype)
    ref = (torch.arange(1000, dtype=torch.int64) * (n * (n + 1) // 2) + n * (n - 1) // 2).to(dtype)
    ys = [torch.full((3, 4), float(r + k)).to(dtype) for k in range(4)]       # several in flight
    handles = [t.allreduce_async_(y) for y in ys]
    h = t.allreduce_async_(x)
    same = h.wait() is x and all(hd.wait() is y for hd, y in zip(handles, ys))
    done = h.test() and all(hd.test() for hd in handles)
    sums = all(torch.equal(y, torch.full((3, 4), float(n * (n - 1) // 2 + n * k)).to(dtype))
               for k, y in enumerate(ys))
    z = torch.arange(5, dtype=torch.float64) + r          # blocking after async: the queue drains first
    t.allreduce_(z, average=True)
    ok = same and done and sums and torch.equal(x, ref) \
        and torch.equal(z, torch.arange(5, dtype=torch.float64) + (n - 1) / 2) \
        and t.calls == 6 and t.bytes_sent == (1000 + 12 * 4) * x.element_size() + 40
    t.close()
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", TRANSPORTS)
def test_a_tensor_over_one_chunk_sums_exactly(name):
    comm = _world()
    n, r = comm.size, comm.rank
    t = _make(name)
    numel = 3 * CHUNK_BYTES // 8 + 17                      # three full pieces and a short one (float64)
    x = torch.arange(numel, dtype=torch.float64) + r
    t.allreduce_async_(x, average=True).wait()
    y = torch.arange(numel, dtype=torch.int64) * (r + 1)
    t.allreduce_(y)
    rows = numel // 7
    view = (torch.arange(rows * 7, dtype=torch.float64) + r).reshape(rows, 7)[:, ::2]   # non-contiguous
    t.allreduce_(view)
    ref_view = torch.arange(rows * 7, dtype=torch.float64).reshape(rows, 7)[:, ::2] * n + n * (n - 1) // 2
    ok = torch.equal(x, torch.arange(numel, dtype=torch.float64) + (n - 1) / 2) \
        and torch.equal(y, torch.arange(numel, dtype=torch.int64) * (n * (n + 1) // 2)) \
        and torch.equal(view, ref_view)
    t.close()
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", TRANSPORTS)
def test_allgatherv_with_uneven_first_dims_and_given_counts(name):
    comm = _world()
    n, r = comm.size, comm.rank
    t = _make(name)
    rows = [(k * 3) % 4 for k in range(n)]                # rank 0 sends no row
    mine = torch.arange(rows[r] * 3, dtype=torch.float32).reshape(rows[r], 3) + 100 * r
    out, counts = t.allgatherv(mine)
    again, counts2 = t.allgatherv(mine, counts=rows)
    ref = np.concatenate([np.arange(rows[k] * 3, dtype=np.float32).reshape(rows[k], 3) + 100 * k
                          for k in range(n)])
    ok = counts == rows and counts2 == rows and np.array_equal(out.numpy(), ref) \
        and np.array_equal(again.numpy(), ref) and out.dtype == torch.float32
    t.close()
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_closed_transport_refuses_calls_and_frees_its_communicator():
    from mpi4py import MPI

    comm = _world()
    t = MPITransport(comm, progress="thread")
    t.allreduce_async_(torch.ones(4)).wait()
    dup = t.comm
    t.close()
    t.close()                                                # idempotent
    refused = []
    for call in (lambda: t.allreduce_(torch.ones(2)), lambda: t.allreduce_async_(torch.ones(2)),
                 lambda: t.allgather(torch.ones(2)), lambda: t.broadcast_(torch.ones(2))):
        try:
            call()
        except RuntimeError as exc:
            refused.append("closed" in str(exc))
    ok = refused == [True] * 4 and dup == MPI.COMM_NULL and t.closed
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_five_transports_created_and_deleted_leave_no_thread():
    comm = _world()
    before = _threads()
    for _ in range(5):
        t = MPITransport(comm, progress="thread")
        t.allreduce_async_(torch.ones(8)).wait()             # the thread starts on first use
        started = _threads() == before + 1 or t.progress != "thread"
        del t
        gc.collect()
    ok = started and _threads() == before
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_shutdown_closes_every_live_transport():
    import hpc_dgrab as hd

    comm = _world()
    hd.shutdown()                                            # the count below includes no engine thread
    before = _threads()
    hd.init(comm)
    live = [MPITransport(comm, progress=p) for p in PROGRESS]
    for t in live:
        t.allreduce_async_(torch.ones(3)).wait()
    hd.allreduce(torch.ones(2))                              # the operations engine's thread, too
    hd.shutdown()
    ok = all(t.closed for t in live) and _threads() == before and not hd.is_initialized()
    hd.init(comm)                                            # usable again after init()
    ok = ok and torch.equal(hd.allreduce(torch.ones(2), op=hd.Sum), torch.full((2,), float(comm.size)))
    ok = ok and hd.broadcast_object({"from": comm.rank}, root_rank=1) == {"from": 1}
    assert _all_true(ok)


def test_single_rank_transport_is_a_transport():
    from mpi4py import MPI

    t = MPITransport(MPI.COMM_SELF)
    x = torch.arange(4.0)
    assert isinstance(t, Transport) and isinstance(t, Collectives) and isinstance(t, PointToPoint)
    assert t.allreduce_async_(x, average=True).wait() is x and torch.equal(x, torch.arange(4.0))
    with pytest.raises(ValueError, match="floating-point"):
        t.allreduce_(torch.ones(2, dtype=torch.int32), average=True)
    with pytest.raises(ValueError, match="progress must be one of"):
        MPITransport(MPI.COMM_SELF, progress="fast")
    t.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", TRANSPORTS)
def test_objects_travel_through_the_transport(name):
    from hpc_dgrab.comm.objects import allgather_object, broadcast_object

    comm = _world()
    n, r = comm.size, comm.rank
    t = _make(name)
    root = n - 1
    got = broadcast_object({"rank": r, "blob": "x" * (1000 * r)} if r == root else None, root, t)
    gathered = allgather_object(("r", r, list(range(r))), t)        # sizes differ per rank
    ok = got == {"rank": root, "blob": "x" * (1000 * root)} \
        and gathered == [("r", k, list(range(k))) for k in range(n)]
    t.close()
    assert _all_true(ok)
