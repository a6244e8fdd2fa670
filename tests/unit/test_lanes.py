"""The unit lane's rule, enforced by tests/conftest.py: a test here cannot start a process."""
import subprocess
import sys

import pytest


def test_unit_lane_refuses_to_start_a_process():
    with pytest.raises(AssertionError, match="tests/unit/ starts no process"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
