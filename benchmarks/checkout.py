"""The checkout these benchmarks live in, how they launch its commands, and what it has installed.

``ROOT`` is the repository root (the parent of ``benchmarks/``); :func:`launcher` names a script of
``launch/``; :func:`child_env` is the environment of a child run (``ROOT`` first on PYTHONPATH, so the
child imports this checkout's ``hpc_dgrab`` and ``benchmarks``; one BLAS/OpenMP thread);
:func:`mpi_command` is the prefix that starts N ranks; :func:`horovod_available` /
:func:`import_horovod` test for and load ``horovod.torch`` (a peer some benchmarks compare with).
The installed package never reads the checkout.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Dict, List

from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launcher(name: str) -> str:
    """Path of ``launch/NAME`` (``local``, ``netem``, ``slurm-local``) in this checkout."""
    return os.path.join(ROOT, "launch", name)


def child_env(single_thread: bool = True) -> Dict[str, str]:
    """This process's environment with ``ROOT`` first on PYTHONPATH and, by default, one BLAS thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if single_thread:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def mpi_command(ranks: int) -> List[str]:
    """``launch/local -n N --`` from this checkout, else plain mpirun with oversubscription."""
    local = launcher("local")
    if os.access(local, os.X_OK):
        return [local, "-n", str(ranks), "--"]
    if shutil.which("mpirun") is None:
        raise UserError("mpirun not found (apt-get install openmpi-bin libopenmpi-dev)")
    return ["mpirun", "-n", str(ranks), "--oversubscribe"]


def horovod_available() -> bool:
    """True when ``horovod.torch`` imports (Horovod is not initialised)."""
    try:
        import horovod.torch  # noqa: F401
    except Exception:   # ImportError, or a broken build raising at load time
        return False
    return True


def import_horovod() -> Any:
    """``horovod.torch``, or a one-line UserError saying how to install it."""
    try:
        import horovod.torch as hvd
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"Horovod with PyTorch support does not import ({reason}); "
                        "install it with 'make horovod'") from None
    return hvd
