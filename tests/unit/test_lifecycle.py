"""hpc_dgrab.lifecycle's pure parts: the grace setting and the one-line description of an exception
(the job-ending behaviour itself runs under launch/local in tests/system/test_job_end.py)."""
import pytest

from hpc_dgrab import lifecycle
from hpc_dgrab.errors import UserError


def test_grace_from_the_environment(monkeypatch):
    monkeypatch.delenv("HPC_DGRAB_DEPARTED_GRACE_S", raising=False)
    assert lifecycle.grace_s() == lifecycle.DEFAULT_GRACE_S == 5.0
    monkeypatch.setenv("HPC_DGRAB_DEPARTED_GRACE_S", "0.5")
    assert lifecycle.grace_s() == 0.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("HPC_DGRAB_DEPARTED_GRACE_S", bad)
        with pytest.raises(UserError, match="HPC_DGRAB_DEPARTED_GRACE_S must be"):
            lifecycle.grace_s()


def test_describe_is_one_line():
    assert lifecycle.describe(RuntimeError("boom\n  at step 5")) == "RuntimeError: boom at step 5"
    assert lifecycle.describe(KeyError()) == "KeyError"
