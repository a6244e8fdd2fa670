"""``python -m hpc_dgrab.info``: one JSON object per rank, printed by rank 0 in rank order."""
from __future__ import annotations

import json
import platform
import sys
from typing import Optional, Sequence

from hpc_dgrab import __version__, runtime
from hpc_dgrab.cli import ArgumentParser, run_main


def horovod_importable() -> bool:
    """True when ``horovod.torch`` imports (it is never imported at package import time)."""
    import importlib.util

    return importlib.util.find_spec("horovod") is not None and _try_import("horovod.torch")


def _try_import(name: str) -> bool:
    import importlib

    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def rank_info() -> dict:
    """This rank's facts as a JSON-ready dict."""
    import mpi4py
    import torch
    from mpi4py import MPI

    rt = runtime.get_runtime()
    return {
        "rank": rt.rank, "size": rt.size, "local_rank": rt.local_rank, "local_size": rt.local_size,
        "node_rank": rt.node_rank, "num_nodes": rt.num_nodes, "hostname": rt.hostname,
        "device": rt.device, "threads": rt.threads, "launcher": rt.launcher,
        "cuda_aware_mpi": rt.cuda_aware_mpi,
        "slurm_job_id": rt.slurm.job_id if rt.slurm else None,
        "slurm": rt.slurm.__dict__ if rt.slurm else None,
        "versions": {"hpc_dgrab": __version__, "python": platform.python_version(),
                     "torch": torch.__version__, "mpi4py": mpi4py.__version__,
                     "mpi": MPI.Get_library_version().splitlines()[0].strip("\x00 "),
                     "mpi_standard": "{}.{}".format(*MPI.Get_version())},
        "horovod": horovod_importable(),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m hpc_dgrab.info",
                            description="Print one JSON object per rank (rank, size, local rank, node, "
                                        "device, threads, versions, Slurm job), from rank 0, sorted by rank.")
    parser.add_argument("--compact", action="store_true", help="one line per rank instead of indented JSON")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    infos = runtime.world().gather(rank_info(), root=0)
    if infos is not None:
        for info in sorted(infos, key=lambda d: d["rank"]):
            sys.stdout.write(json.dumps(info, indent=None if args.compact else 2, sort_keys=True) + "\n")
        sys.stdout.flush()
    return 0


def cli() -> None:
    """Console-script entry point: :func:`main` under the one-line error contract."""
    run_main(main)


if __name__ == "__main__":
    cli()
