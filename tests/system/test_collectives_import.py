"""Importing the collectives does not load Horovod (checked in a fresh process)."""
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
