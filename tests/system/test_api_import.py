"""Importing the package starts nothing: no torch, no mpi4py, no context (checked in a fresh process)."""
import subprocess
import sys

import pytest

import hpc_dgrab as hd
from tests.helpers import ROOT


def test_import_initialises_nothing():
    code = ("import sys, hpc_dgrab, hpc_dgrab.data; "
            "assert 'torch' not in sys.modules and 'mpi4py' not in sys.modules, sorted(sys.modules); "
            "assert not hpc_dgrab.__dict__.get('_CONTEXT'); print(len(hpc_dgrab.__all__))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 15
    with pytest.raises(AttributeError):
        hd.no_such_name  # noqa: B018
