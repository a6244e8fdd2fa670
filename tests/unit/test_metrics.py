"""Metrics files: strict JSON, every epoch once on resume, and the one reader (append streams that
survive a crash: tests/system/test_metrics_crash.py)."""
import json

import numpy as np
import pytest

from hpc_dgrab.metrics import MetricsError, MetricsLog, format_epoch, read_jsonl, to_line


def rec(epoch, loss=1.0, **extra):
    return {"epoch": epoch, "train_loss": loss, "val_loss": 2.0, "val_acc": 0.5, "epoch_time_s": 0.25,
            "comm_bytes": 1000, **extra}


@pytest.mark.parametrize("bad,where", [
    (float("nan"), "train_loss"), (float("inf"), "train_loss"), (np.float32("-inf"), "train_loss"),
])
def test_non_finite_numbers_are_refused(tmp_path, bad, where):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(str(path))
    with pytest.raises(MetricsError, match=f"metrics: {where} is"):
        log.append(rec(1, loss=bad))
    with pytest.raises(MetricsError, match=r"metrics: ranks\[1\] is nan"):
        log.append(rec(1, ranks=[1.0, float("nan")]))
    assert not path.exists() and log.records == []


def test_lines_are_strict_json_with_null_for_missing_values(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path)
    log.append(rec(1, val_loss=None, steps=np.int64(3), per_rank=np.array([0.5, 1.5])))
    text = open(path).read()
    assert text == ('{"epoch": 1, "train_loss": 1.0, "val_loss": null, "val_acc": 0.5, "epoch_time_s": 0.25, '
                    '"comm_bytes": 1000, "steps": 3, "per_rank": [0.5, 1.5]}\n')
    assert "val_loss" not in format_epoch(read_jsonl(path)[0], 3)
    assert format_epoch(rec(2), 3).startswith("epoch   2/3  train_loss 1.0000  val_loss 2.0000  val_acc 50.00%")


def test_reader_rejects_bare_nan_and_reports_the_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(to_line(rec(1)) + '{"epoch": 2, "train_loss": NaN}\n')
    with pytest.raises(MetricsError, match=r"m.jsonl:2: not a JSON object line \(non-standard JSON constant NaN\)"):
        read_jsonl(str(path))
    path.write_text(to_line(rec(1)) + "\n[1, 2]\n")
    with pytest.raises(MetricsError, match=r":3: .*expected a JSON object, got list"):
        read_jsonl(str(path))
    with pytest.raises(MetricsError, match="absent.jsonl: no such file"):
        read_jsonl(str(tmp_path / "absent.jsonl"))
    path.write_text("")
    assert read_jsonl(str(path)) == []


def test_resume_keeps_each_epoch_once(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path)
    for e in (1, 2, 3, 4):
        log.append(rec(e, loss=float(e)))
    # the checkpoint was at epoch 2 (epochs 3 and 4 ran after it and are redone)
    resumed = MetricsLog(path, resume_epoch=2)
    assert [r["epoch"] for r in read_jsonl(path)] == [1, 2]
    with pytest.raises(MetricsError, match="epoch 2 recorded after epoch 2"):
        resumed.append(rec(2))
    for e in (3, 4):
        resumed.append(rec(e, loss=10.0 + e))
    assert [(r["epoch"], r["train_loss"]) for r in read_jsonl(path)] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    # a fresh run (no resume) replaces the old file at its first record
    fresh = MetricsLog(path)
    fresh.append(rec(1, loss=7.0))
    assert read_jsonl(path) == [json.loads(to_line(rec(1, loss=7.0)))]
