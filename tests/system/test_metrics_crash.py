"""Per-rank append streams survive a crash of their process (os._exit mid-line) and resume."""
import os
import subprocess
import sys

import pytest

from hpc_dgrab.metrics import MetricsError, MetricsLog, rank_path, read_jsonl
from tests.helpers import ROOT

CRASHER = """
import os, sys
from hpc_dgrab.metrics import MetricsLog
log = MetricsLog(sys.argv[1], append_lines=True)
for e in (1, 2, 3):
    log.append({"epoch": e, "train_loss": float(e)})
with open(sys.argv[1], "a") as fh:
    fh.write('{"epoch": 4, "train_lo')  # an append cut short
    fh.flush()
os._exit(9)  # die without any clean-up
"""


def test_append_stream_survives_a_crash_and_resumes(tmp_path):
    path = rank_path(str(tmp_path / "m.jsonl"), 3)
    assert path.endswith("m.jsonl.rank3")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CRASHER, path], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 9, proc.stderr
    with pytest.raises(MetricsError, match=":4: "):
        read_jsonl(path)
    assert [r["epoch"] for r in read_jsonl(path, allow_torn_tail=True)] == [1, 2, 3]
    log = MetricsLog(path, resume_epoch=2, append_lines=True)  # the checkpoint was at epoch 2
    assert [r["epoch"] for r in read_jsonl(path)] == [1, 2]
    log.append({"epoch": 3, "train_loss": 30.0})
    assert open(path).read().endswith('{"epoch": 3, "train_loss": 30.0}\n')
    assert [r["train_loss"] for r in read_jsonl(path)] == [1.0, 2.0, 30.0]
