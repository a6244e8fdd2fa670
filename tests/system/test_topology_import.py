"""Importing the topology module loads neither mpi4py nor torch (checked in a fresh process)."""
import subprocess
import sys

import pytest

from hpc_dgrab.runtime import launched_by_mpi


@pytest.mark.skipif(launched_by_mpi(), reason="serial-only: spawns a Python process")
def test_import_does_not_load_mpi():
    code = "import sys, hpc_dgrab.comm.topology; print('mpi4py' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
