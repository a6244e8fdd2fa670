"""D-GraB through the trainer's command line: metrics and byte counts, resume, the half payload."""
import json

import numpy as np
import pytest

from tests.helpers import assert_one_line_error, run_cmd

# ---------------------------------------------------------------------- trainer integration

@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from hpc_dgrab.data.shards import write_shards
    from hpc_dgrab.data.sources import load_source

    src = load_source("digits")
    idx = np.random.default_rng(0).permutation(len(src.y))[:400]
    out = str(tmp_path_factory.mktemp("order-data") / "digits-2")
    write_shards(src, out, 2, [idx[:160], idx[160:320]], idx[320:])
    return out


def test_trainer_dgrab_metrics_and_batchnorm_error(digits_dir, tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = run_cmd(["-m", "hpc_dgrab.train", "--data", digits_dir, "--model", "logreg", "--epochs", "2",
                    "--batch-size", "5", "--lr", "0.05", "--order", "dgrab", "--metrics", str(metrics),
                    "--progress", "off"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(recs) == 2
    d = 64 * 10 + 10
    steps = recs[0]["steps"]
    assert recs[0]["order_bytes"] == steps * (d + 1) * 4  # parallel mode: d floats + digest per step
    # gradient + order payload + the trainer's 2 control floats + one "used" flag per parameter
    # tensor (weight, bias) + 3 agreement flags, in one message per step
    assert recs[0]["comm_bytes"] == steps * (d + 2 + 2 + 3) * 4 + recs[0]["order_bytes"]
    assert recs[1]["train_loss"] < recs[0]["train_loss"]
    bad = run_cmd(["-m", "hpc_dgrab.train", "--data", digits_dir, "--model", "cnn-bn", "--epochs", "1",
                   "--order", "grab"], timeout=120)
    assert_one_line_error(bad, "BatchNorm", "microbatch")


def test_trainer_dgrab_resume_continues_identically(digits_dir, tmp_path):
    base = ["-m", "hpc_dgrab.train", "--data", digits_dir, "--model", "logreg", "--batch-size", "7",
            "--lr", "0.05", "--order", "dgrab", "--dgrab-mode", "exact", "--progress", "off"]
    straight, resumed = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    ckpt = str(tmp_path / "ckpt")
    procs = [run_cmd(base + ["--epochs", "2", "--metrics", str(straight)], timeout=120),
             run_cmd(base + ["--epochs", "1", "--metrics", str(resumed), "--checkpoint-dir", ckpt], timeout=120)]
    procs.append(run_cmd(base + ["--epochs", "2", "--metrics", str(resumed), "--checkpoint-dir", ckpt,
                                 "--resume"], timeout=120))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
    a = [json.loads(line) for line in straight.read_text().splitlines()]
    b = [json.loads(line) for line in resumed.read_text().splitlines()]
    assert [r["epoch"] for r in b] == [1, 2]
    for key in ("train_loss", "val_loss", "val_acc", "comm_bytes", "order_bytes"):
        assert a[1][key] == b[1][key], key  # the order (and so the whole run) continued identically


def test_trainer_half_payload_bytes_and_refusals(digits_dir, tmp_path):
    base = ["-m", "hpc_dgrab.train", "--data", digits_dir, "--model", "logreg", "--batch-size", "5",
            "--lr", "0.05", "--order", "dgrab", "--progress", "off"]
    metrics, ckpt = tmp_path / "m.jsonl", str(tmp_path / "ckpt")
    proc = run_cmd(base + ["--epochs", "1", "--dgrab-payload", "half", "--metrics", str(metrics),
                           "--checkpoint-dir", ckpt], timeout=120)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(metrics.read_text().splitlines()[0])
    d = 64 * 10 + 10
    assert rec["order_bytes"] == rec["steps"] * (d // 2 + 1) * 4   # half of d + the digest per step
    assert_one_line_error(run_cmd(base + ["--epochs", "2", "--checkpoint-dir", ckpt, "--resume"], timeout=120),
                          "this run has --dgrab-payload full")   # a half-payload checkpoint does not resume as full
    assert_one_line_error(run_cmd(base + ["--epochs", "1", "--dgrab-mode", "exact", "--dgrab-payload", "half"],
                                  timeout=120), "--dgrab-payload needs")
