"""Gossip (with a straggler) and GradAlign through the trainer's command line on 4 ranks."""
import json

import pytest

from tests.helpers import assert_one_line_error, run_cmd

TRAIN = ["-m", "hpc_dgrab.train", "--model", "mlp", "--lr", "0.05", "--batch-size", "16", "--seed", "1"]


def _metrics(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_train_gossip_with_straggler_end_to_end(digits_shards, tmp_path):
    out = tmp_path / "g.jsonl"
    proc = run_cmd(TRAIN + ["--data", digits_shards, "--epochs", "3", "--sync", "gossip", "--topology",
                            "one-peer-exponential", "--straggler", "1:3", "--metrics", str(out)],
                   ranks=4, timeout=240)
    assert proc.returncode == 0, proc.stderr
    recs = _metrics(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "val_acc", "epoch_time_s", "comm_bytes", "staleness_avg",
                "staleness_max", "messages", "replacements", "skipped_pushes"):
        assert key in recs[0]
    last = recs[-1]
    assert abs(sum(last["final_weight_ranks"]) - 4) < 1e-4      # push-sum mass after the drain
    assert last["avg_model_val_acc"] > 0.8 and min(last["own_model_val_acc_ranks"]) > 0.8
    assert last["straggler_idle_s_ranks"][1] > 0 and last["straggler_idle_s_ranks"][0] == 0
    assert recs[2]["train_loss"] < recs[0]["train_loss"]
    assert "average model" in proc.stdout


def test_train_gradalign_end_to_end(digits_shards, tmp_path):
    out = tmp_path / "ga.jsonl"
    proc = run_cmd(TRAIN + ["--data", digits_shards, "--epochs", "2", "--momentum", "0", "--gradalign-beta",
                            "0.02", "--local-steps", "3", "--metrics", str(out)], ranks=4, timeout=240)
    assert proc.returncode == 0, proc.stderr
    recs = _metrics(out)
    assert [r["local_steps"] for r in recs] == [3, 3] and recs[-1]["val_acc"] > 0.5
    # two all-reduces of (params + 1 count) float32 per round, from each of the 4 ranks (mlp on 8x8: 9610 params),
    # plus the trainer's control all-reduce (2 int32: stop, non-finite) per round
    assert recs[0]["comm_bytes"] == recs[0]["rounds"] * 4 * (2 * 4 * (9610 + 1) + 8)


def test_bad_straggler_and_combination_errors(digits_shards):
    proc = run_cmd(TRAIN + ["--data", digits_shards, "--epochs", "1", "--straggler", "9:3"], ranks=2, timeout=120)
    assert_one_line_error(proc, "--straggler", "out of range")
    proc = run_cmd(TRAIN + ["--data", digits_shards, "--epochs", "1", "--sync", "gossip", "--topology", "moebius"],
                   ranks=2, timeout=120)
    assert_one_line_error(proc, "--topology")


@pytest.mark.slow
def test_train_compressed_gossip_checkpoints_and_resumes(digits_shards, tmp_path):
    """--sync gossip --compress topk on 2 ranks (ring): every push is the header plus k (index,
    value) pairs of float32 (mlp on 8x8: 9610 params, k = 961); stopped at 2 epochs, resumed to 3."""
    out, ck = tmp_path / "cg.jsonl", tmp_path / "ck"
    args = TRAIN + ["--data", digits_shards, "--sync", "gossip", "--topology", "ring", "--compress", "topk",
                    "--density", "0.1", "--metrics", str(out), "--checkpoint-dir", str(ck)]
    proc = run_cmd(args + ["--epochs", "2"], ranks=2, timeout=240)
    assert proc.returncode == 0, proc.stderr
    recs = _metrics(out)
    assert recs[0]["messages"] > 0 and recs[0]["comm_bytes"] == recs[0]["messages"] * (40 + 961 * 8)
    proc = run_cmd(args + ["--epochs", "3", "--resume"], ranks=2, timeout=240)
    assert proc.returncode == 0, proc.stderr
    recs = _metrics(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert recs[-1]["avg_model_val_acc"] > 0.8
