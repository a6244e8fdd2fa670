"""``python -m benchmarks peers --quick``: each system runs in its own processes and the report
has a median and a ratio per setting. Two systems only (each run starts 2 Python processes; the full
set with Horovod is what the benchmark itself runs)."""
import json
import math
import os

import pytest

from tests.helpers import run_cmd

pytestmark = pytest.mark.slow


def test_peers_quick(tmp_path):
    proc = run_cmd(["-m", "benchmarks", "peers", "--quick", "--systems", "hpc_dgrab,ddp",
                    "--timeout", "90", "--out", str(tmp_path)], timeout=240)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "peers.json") as fh:
        result = json.load(fh)
    assert not [r for r in result["runs"] if r["system"] == "hpc_dgrab" and "error" in r], result["runs"]
    assert os.path.getsize(tmp_path / "peers.png") > 0
    systems = {r["system"] for r in result["runs"]}
    assert systems == {"hpc_dgrab", "ddp"}
    assert not [r for r in result["runs"] if "error" in r]
    (row,) = result["summary"]
    assert row["ranks"] == 2 and 15_000 < row["params"] < 25_000
    assert row["best_peer"] == "ddp" and row["hpc_dgrab"] > 0
    assert math.isclose(row["ratio_hpc_dgrab"], row["hpc_dgrab"] / row["ddp"])
    assert "ratio" in proc.stdout
