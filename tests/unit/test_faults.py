"""Fault injection: the spec grammar, and a fault that fires exactly at the N-th visit of a point."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from hpc_dgrab import faults
from hpc_dgrab.faults import Fault

SCRIPT = """
import sys
from hpc_dgrab import faults
for i in range(1, 6):
    print(i, flush=True)
    faults.point("loop")
"""


def test_parse():
    assert faults.parse("shards.file#2:SIGINT, train.step#5@1:SIGUSR1,x:exit:3") == [
        Fault("shards.file", 2, None, "SIGINT"), Fault("train.step", 5, 1, "SIGUSR1"), Fault("x", 1, None, "exit:3")]
    assert faults.parse("") == []
    for bad in ("x", "x:NOPE", "x#0:SIGINT", "x@a:SIGINT", "x:exit:a", "x:SIG_DFL"):
        with pytest.raises(ValueError, match="HPC_DGRAB_FAULT: "):
            faults.parse(bad)


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
