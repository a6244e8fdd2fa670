"""Fault injection in a process: a fault fires exactly at the N-th visit of a point."""
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SCRIPT = """
import sys
from hpc_dgrab import faults
for i in range(1, 6):
    print(i, flush=True)
    faults.point("loop")
"""


@pytest.mark.parametrize("spec,code,printed", [
    ("loop#3:exit:7", 7, "1\n2\n3\n"),
    ("loop#2:SIGTERM", -15, "1\n2\n"),
    ("loop#2@5:SIGTERM", 0, "1\n2\n3\n4\n5\n"),  # another rank's fault
    ("other:SIGTERM", 0, "1\n2\n3\n4\n5\n"),
])
def test_fault_fires_at_the_nth_visit(spec, code, printed):
    env = dict(os.environ, HPC_DGRAB_FAULT=spec, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):  # launcher rank 0
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (code, printed), proc.stderr
