"""The operations timeline stays valid JSON when its process is killed mid-run (SIGKILL: no
clean-up at all). (Exit without hd.shutdown() is exercised by every tests/mpi run of the ops.)"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

RUNNER = """
import sys, time, torch
import hpc_dgrab as hd
hd.init()
hd.start_timeline(sys.argv[1])
t0 = time.time()
while True:
    hd.allreduce(torch.ones(16), name="step", op=hd.Sum)
    if time.time() - t0 > 2.5:                   # the file has been rewritten at least twice
        print("ready", flush=True)
        t0 = float("inf")
"""

def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1")


@pytest.mark.slow   # MPI's singleton start-up dominates (seconds idle, ~30 s on a loaded 2-core box)
def test_timeline_is_valid_json_after_a_kill(tmp_path):
    path = str(tmp_path / "trace.json")
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, path], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line == "ready", proc.stderr.read() if proc.poll() is not None else line
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    with open(path) as f:
        doc = json.load(f)
    steps = [e for e in doc["traceEvents"] if e.get("name") == "step"]
    assert steps and all(e["ph"] == "X" and e["args"]["bytes"] == 64 for e in steps)
    assert doc["otherData"]["truncated"] is False
