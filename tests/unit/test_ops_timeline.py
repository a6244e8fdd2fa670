"""The operations timeline's file (hpc_dgrab.ops.timeline.Timeline): per-rank names, bounded
events with the truncation noted, and a whole JSON document after every flush."""
import json
import os

from hpc_dgrab.ops.timeline import Timeline, rank_path


def test_rank_paths():
    assert rank_path("/x/trace.json", 0) == "/x/trace.json"
    assert rank_path("/x/trace.json", 3) == "/x/trace.rank3.json"
    assert rank_path("/x/trace", 2) == "/x/trace.rank2.json"


def test_events_are_capped_and_the_file_says_so(tmp_path):
    path = str(tmp_path / "t.json")
    tl = Timeline(path, rank=1, max_events=3)
    assert json.load(open(path))["traceEvents"][0]["ph"] == "M"        # valid from the start
    for i in range(5):
        tl.record(f"op{i}", "allreduce", 16, submitted=10.0 + i, started=10.5 + i, ended=11.0 + i)
    tl.close()
    doc = json.load(open(path))
    events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in events] == ["op0", "op1", "op2"]
    assert events[0]["ts"] == 10_000_000 and events[0]["dur"] == 1_000_000
    assert events[0]["args"] == {"bytes": 16, "wait_us": 500_000, "run_us": 500_000}
    assert doc["otherData"] == {"rank": 1, "events": 3, "dropped_events": 2, "truncated": True}
    assert os.listdir(tmp_path) == ["t.json"]                           # no temporary left behind
