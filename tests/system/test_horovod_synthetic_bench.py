"""``python -m benchmarks horovod-synthetic --quick``: Horovod's synthetic benchmark method runs with
fp16 compression and reports img/s per setting (ours only: one 2-rank job, about 20 s; the run
against Horovod is what the benchmark itself does)."""
import json

import pytest

from tests.helpers import run_cmd

pytestmark = pytest.mark.slow


def test_horovod_synthetic_quick(tmp_path):
    proc = run_cmd(["-m", "benchmarks", "horovod-synthetic", "--quick", "--systems", "hpc_dgrab",
                    "--fp16", "on", "--timeout", "200", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "horovod_synthetic.json") as fh:
        result = json.load(fh)
    (run,) = result["runs"]
    assert "error" not in run, run
    assert run["system"] == "hpc_dgrab" and run["ranks"] == 2 and run["fp16"] is True
    (row,) = result["summary"]
    assert row["hpc_dgrab"] == run["img_sec"] > 0 and row["ratio"] is None
    assert "hpc_dgrab" in proc.stdout and "img/s" in proc.stdout
