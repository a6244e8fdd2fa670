"""Importing the collectives does not load Horovod (checked in a fresh process)."""
import os
import subprocess
import sys

import pytest

from hpc_dgrab.runtime import launched_by_mpi


@pytest.mark.skipif(launched_by_mpi(), reason="serial-only: spawns a Python process")
def test_import_does_not_load_horovod():
    code = "import sys, hpc_dgrab.comm.collectives; print('horovod' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(launched_by_mpi(), reason="serial-only: spawns a Python process")
def test_comm_package_and_topology_import_neither_mpi_nor_torch():
    code = ("import sys, hpc_dgrab.comm, hpc_dgrab.comm.topology; "
            "print(sorted(m for m in ('mpi4py', 'torch', 'horovod') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(launched_by_mpi(), reason="serial-only: spawns a Python process")
def test_thread_progress_falls_back_to_inline_without_thread_multiple():
    code = ("import torch; from hpc_dgrab.comm.mpi import MPITransport; t = MPITransport(); "
            "h = t.allreduce_async_(torch.ones(3)); "
            "print(t.progress, h.test(), torch.equal(h.wait(), torch.ones(3)))")
    env = dict(os.environ, MPI4PY_RC_THREAD_LEVEL="serialized")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    assert out.stdout.split() == ["inline", "True", "True"]
