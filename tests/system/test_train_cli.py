"""End-to-end: the trainer and info under mpirun, resume, and one-line errors for bad input."""
import json
import os

import pytest

from hpc_dgrab.metrics import read_jsonl
from tests.helpers import assert_one_line_error, run_cmd

TRAIN = ["-m", "hpc_dgrab.train", "--model", "cnn", "--lr", "0.05", "--batch-size", "16", "--seed", "1"]


def _metrics(path):
    return read_jsonl(path)


def test_info_reports_every_rank():
    proc = run_cmd(["-m", "hpc_dgrab.info", "--compact"], ranks=4, timeout=120)
    assert proc.returncode == 0, proc.stderr
    infos = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [i["rank"] for i in infos] == [0, 1, 2, 3]
    assert all(i["size"] == 4 and i["local_size"] == 4 and i["num_nodes"] == 1 for i in infos)
    assert sorted(i["local_rank"] for i in infos) == [0, 1, 2, 3]
    assert all(i["device"] == "cpu" and i["slurm_job_id"] is None for i in infos)


def test_train_four_ranks_learns_and_resumes(digits_shards, tmp_path):
    straight = tmp_path / "straight.jsonl"
    proc = run_cmd(TRAIN + ["--data", digits_shards, "--epochs", "3", "--metrics", str(straight)], ranks=4)
    assert proc.returncode == 0, proc.stderr
    recs = _metrics(straight)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "val_acc", "epoch_time_s", "comm_bytes"):
        assert key in recs[0]
    assert recs[2]["train_loss"] < recs[0]["train_loss"]
    assert recs[2]["val_acc"] > 0.8
    assert "epoch   3/3" in proc.stdout
    # dense all-reduce: every rank hands the whole gradient to MPI once per step, plus the trainer's
    # 2 control floats (stop, non-finite) and the optimizer's one "used" flag per parameter tensor:
    # steps x ranks x float32 x (cnn params on 8x8 input + 2 + 6 tensors)
    assert recs[0]["comm_bytes"] == recs[0]["steps"] * 4 * 4 * (6090 + 2 + 6 + 3)   # + 3 agreement flags

    # stop after 2 epochs, resume to 3: the same numbers as the straight run
    ckpt, resumed = tmp_path / "ckpt", tmp_path / "resumed.jsonl"
    base = TRAIN + ["--data", digits_shards, "--checkpoint-dir", str(ckpt), "--metrics", str(resumed)]
    assert run_cmd(base + ["--epochs", "2"], ranks=4).returncode == 0
    assert json.load(open(ckpt / "latest.json"))["position"] == {"epoch": 2, "step": 0}
    proc = run_cmd(base + ["--epochs", "3", "--resume"], ranks=4)
    assert proc.returncode == 0, proc.stderr
    again = _metrics(resumed)
    assert [r["epoch"] for r in again] == [1, 2, 3]
    for a, b in zip(again, recs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9, abs=1e-12)
        assert a["val_acc"] == b["val_acc"]


@pytest.mark.parametrize("argv, fragment", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--model", "resnet999"], "resnet999"),
])
def test_bad_flags_one_line_error(argv, fragment, digits_shards):
    proc = run_cmd(["-m", "hpc_dgrab.train", "--data", digits_shards] + argv, ranks=1, timeout=120)
    assert_one_line_error(proc, fragment)
    assert proc.returncode == 2


def test_missing_data_every_rank_exits(tmp_path):
    missing = str(tmp_path / "nowhere" / "shards")
    proc = run_cmd(["-m", "hpc_dgrab.train", "--data", missing, "--epochs", "1"], ranks=4, timeout=120)
    assert_one_line_error(proc, missing)


def test_shard_count_incompatible_with_ranks(digits_shards):
    proc = run_cmd(["-m", "hpc_dgrab.train", "--data", digits_shards, "--epochs", "1"], ranks=3, timeout=120)
    assert_one_line_error(proc, "4 shards")
    assert not os.path.exists(os.path.join(digits_shards, "latest.json"))
