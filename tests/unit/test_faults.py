"""Fault injection: the spec grammar (firing in a process: tests/system/test_faults_process.py)."""
import pytest

from hpc_dgrab import faults
from hpc_dgrab.faults import Fault


def test_parse():
    assert faults.parse("shards.file#2:SIGINT, train.step#5@1:SIGUSR1,x:exit:3") == [
        Fault("shards.file", 2, None, "SIGINT"), Fault("train.step", 5, 1, "SIGUSR1"), Fault("x", 1, None, "exit:3")]
    assert faults.parse("") == []
    for bad in ("x", "x:NOPE", "x#0:SIGINT", "x@a:SIGINT", "x:exit:a", "x:SIG_DFL"):
        with pytest.raises(ValueError, match="HPC_DGRAB_FAULT: "):
            faults.parse(bad)
