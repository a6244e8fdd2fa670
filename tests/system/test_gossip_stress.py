"""8 ranks, 10 000 asynchronous gossip steps with random sleeps: no deadlock, nothing leaked, mass kept.

A serial test that launches ``launch/local -n 8`` in a subprocess with a hard timeout (a deadlock
fails the test instead of hanging the suite). Each rank runs a different number of steps on the
time-varying one-peer exponential graph; the self-test checks conservation on every rank.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

TIMEOUT_S = 300   # mostly start-up of 8 oversubscribed Python+torch processes on a busy machine


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 30)
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
def test_gossip_stress_8_ranks_10000_steps():
    cmd = [os.path.join(ROOT, "launch", "local"), "-n", "8", "--", sys.executable, "-m",
           "hpc_dgrab.comm.selftest", "--steps", "10000", "--topology", "one-peer-exponential",
           "--sleep-us", "30", "--sleep-prob", "0.3", "--max-in-flight", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"gossip stress did not finish in {TIMEOUT_S} s (deadlock?): {exc.stderr!r}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["ok"] is True
    assert result["ranks"] == 8
    assert result["steps_per_rank"] == [10000 - 7 * r for r in range(8)]
    assert result["leaked_requests"] == 0
    assert result["messages_sent"] == result["messages_received"] > 8 * 1000
    assert abs(result["weight_sum"] - 8) < 1e-9
    assert result["numerator_error"] < 1e-6
