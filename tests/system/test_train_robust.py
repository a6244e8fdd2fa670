"""The trainer as production software: preemption and resume, one job per directory, clean
failures, refused combinations and flags, --config. Each test is a failure of the old trainer.

Signals are delivered deterministically: ``HPC_DGRAB_FAULT=train.step#N@RANK:SIGNAL`` makes one rank
send the signal to itself before its N-th step, so no test races a signal against the work.
"""
import json
import os
import pickle
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT, assert_one_line_error, run_cmd

BASE = ["-m", "hpc_dgrab.train", "--model", "logreg", "--lr", "0.05", "--batch-size", "16", "--seed", "1",
        "--progress", "off"]
EXIT_PREEMPTED = 75


def _strict(path):
    """Every line parsed by a strict JSON parser (NaN / Infinity refused)."""
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name} in {path}")

    with open(path) as fh:
        return [json.loads(line, parse_constant=refuse) for line in fh if line.strip()]


def _with_fault(spec):
    old = os.environ.get("HPC_DGRAB_FAULT")
    os.environ["HPC_DGRAB_FAULT"] = spec
    return old


def _run_with_fault(spec, args, ranks, timeout=300):
    old = _with_fault(spec)
    try:
        return run_cmd(args, ranks=ranks, timeout=timeout)
    finally:
        if old is None:
            del os.environ["HPC_DGRAB_FAULT"]
        else:
            os.environ["HPC_DGRAB_FAULT"] = old


@pytest.mark.parametrize("extra, fault_step, where", [
    ([], 40, "epoch 2 step 15"),                      # 25 steps per epoch
    (["--order", "dgrab", "--compress", "regtopk", "--density", "0.05"], 40, "epoch 2 step 15"),
    (["--momentum", "0", "--gradalign-beta", "0.02", "--local-steps", "3"], 12, "epoch 2 step 4"),  # 8 rounds
], ids=["rr-dense", "dgrab-regtopk", "gradalign"])
def test_sigusr1_mid_epoch_then_resume_equals_straight_run(digits_shards, tmp_path, extra, fault_step, where):
    args = BASE + ["--data", digits_shards, "--epochs", "3"] + extra
    straight = tmp_path / "straight.jsonl"
    proc = run_cmd(args + ["--metrics", str(straight)], ranks=4)
    assert proc.returncode == 0, proc.stderr
    ckpt, resumed = tmp_path / "ckpt", tmp_path / "resumed.jsonl"
    run = args + ["--metrics", str(resumed), "--checkpoint-dir", str(ckpt)]
    # rank 1 raises SIGUSR1 before its N-th step: every rank stops after that step, mid-epoch 2
    proc = _run_with_fault(f"train.step#{fault_step}@1:SIGUSR1", run, ranks=4)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("stopped by")]
    assert line == [f"stopped by SIGUSR1 at {where}; checkpoint in {ckpt}; continue with --resume"]
    assert [r["epoch"] for r in _strict(resumed)] == [1]
    proc = run_cmd(run + ["--resume"], ranks=4)
    assert proc.returncode == 0, proc.stderr
    a, b = _strict(straight), _strict(resumed)
    assert [r["epoch"] for r in b] == [1, 2, 3]  # every epoch exactly once
    for ra, rb in zip(a, b):
        assert abs(ra["train_loss"] - rb["train_loss"]) <= 1e-6
        assert ra["val_acc"] == rb["val_acc"] and ra["comm_bytes"] == rb["comm_bytes"]


def test_gossip_sigterm_drains_and_resumes_with_mass_conserved(digits_shards, tmp_path):
    args = BASE + ["--data", digits_shards, "--epochs", "3", "--sync", "gossip", "--metrics",
                   str(tmp_path / "g.jsonl"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    proc = _run_with_fault("train.step#30@2:SIGTERM", args, ranks=4)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert "stopped by SIGTERM at epoch" in proc.stderr
    kept = _strict(tmp_path / "g.jsonl.rank2")  # each rank's epochs were appended as they ended
    assert [r["epoch"] for r in kept] == [1]
    proc = run_cmd(args + ["--resume"], ranks=4)
    assert proc.returncode == 0, proc.stderr
    recs = _strict(tmp_path / "g.jsonl")
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert abs(sum(recs[-1]["final_weight_ranks"]) - 4) < 1e-9  # push-sum mass survived the stop


def test_resume_without_checkpoint_starts_fresh(digits_shards, tmp_path):
    proc = run_cmd(BASE + ["--data", digits_shards, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "c"),
                           "--resume", "--metrics", str(tmp_path / "m.jsonl")], ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert "starting from scratch" in proc.stderr
    assert [r["epoch"] for r in _strict(tmp_path / "m.jsonl")] == [1]


def test_nonfinite_loss_stops_every_rank_with_one_line(digits_shards, tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    proc = run_cmd(["-m", "hpc_dgrab.train", "--data", digits_shards, "--model", "mlp", "--lr", "1e20",
                    "--epochs", "3", "--batch-size", "16", "--checkpoint-dir", str(ckpt),
                    "--metrics", str(metrics)], ranks=4)
    line = assert_one_line_error(proc, "non-finite loss or gradient on rank", "at epoch 1 step")
    assert re.search(r"on rank \d at epoch 1 step \d+", line)
    assert not (ckpt / "latest.json").exists()  # nothing saved from a diverged run
    assert not metrics.exists() or _strict(metrics) == []


def test_lr_inf_refused():
    proc = run_cmd(["-m", "hpc_dgrab.train", "--data", "x", "--lr", "inf"])
    assert_one_line_error(proc, "--lr", "finite")


def test_second_job_on_the_same_directory_is_refused(digits_shards, tmp_path):
    from hpc_dgrab import locks

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with locks.hold(str(ckpt), "--checkpoint-dir"):  # the first job
        proc = run_cmd(BASE + ["--data", digits_shards, "--epochs", "1", "--checkpoint-dir", str(ckpt)], ranks=2)
    assert_one_line_error(proc, "in use by")
    assert not (ckpt / "latest.json").exists()
    metrics = tmp_path / "m.jsonl"
    with locks.hold(str(metrics), "--metrics"):
        proc = run_cmd(BASE + ["--data", digits_shards, "--epochs", "1", "--metrics", str(metrics)], ranks=2)
    assert_one_line_error(proc, "in use by")


def test_resume_with_a_changed_model_is_one_line(digits_shards, tmp_path):
    run = ["--data", digits_shards, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert run_cmd(BASE + run, ranks=2).returncode == 0
    changed = [a if a != "logreg" else "mlp" for a in BASE]
    proc = run_cmd(changed + run + ["--epochs", "2", "--resume"], ranks=2)
    assert_one_line_error(proc, "--model logreg", "--model mlp")
    proc = run_cmd(BASE + run + ["--epochs", "2", "--resume"], ranks=4)
    assert_one_line_error(proc, "ranks")


def test_missing_pointer_uses_the_newest_checkpoint(digits_shards, tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    run = BASE + ["--data", digits_shards, "--checkpoint-dir", str(ckpt), "--metrics", str(metrics)]
    assert run_cmd(run + ["--epochs", "2"], ranks=2).returncode == 0
    os.unlink(ckpt / "latest.json")
    proc = run_cmd(run + ["--epochs", "3", "--resume"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert "starting from scratch" not in proc.stderr and "resuming from" in proc.stderr
    assert [r["epoch"] for r in _strict(metrics)] == [1, 2, 3]  # epochs 1-2 kept, 3 trained once


def test_crafted_pickle_in_the_checkpoint_directory_never_runs(digits_shards, tmp_path):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    ckpt.mkdir()

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for r in range(2):  # where the old trainer looked: ckpt-e<EPOCH>-r<RANK>.pt + latest.json
        (ckpt / f"ckpt-e00001-r{r:05d}.pt").write_bytes(pickle.dumps({"epoch": 1, "x": Evil()}))
    (ckpt / "latest.json").write_text(json.dumps({"epoch": 1, "world_size": 2}))
    run_cmd(BASE + ["--data", digits_shards, "--epochs", "2", "--checkpoint-dir", str(ckpt), "--resume"], ranks=2)
    assert not marker.exists()


def test_killed_rank_ends_every_rank(digits_shards, tmp_path):
    # rank 1 dies by SIGKILL before its 5th step; the others must not wait forever in the all-reduce
    args = BASE + ["--data", digits_shards, "--epochs", "50", "--metrics", str(tmp_path / "m.jsonl")]
    try:
        proc = _run_with_fault("train.step#5@1:SIGKILL", args, ranks=4, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the job did not end after one rank was killed")
    assert proc.returncode != 0


# ------------------------------------------------------------------ in-process checks (no MPI)

def _parse(argv):
    from hpc_dgrab.train import parse_args

    return parse_args(["--data", "somewhere"] + argv)


def _refusal(argv):
    from hpc_dgrab.errors import UserError

    with pytest.raises(UserError) as info:
        _parse(argv)
    return str(info.value)


def _combination_argv(sync, order, compress, gradalign):
    argv = ["--sync", sync, "--order", order, "--compress", compress]
    return argv + (["--gradalign-beta", "0.1"] if gradalign else [])


def test_every_refused_combination_gives_its_reason_and_every_other_parses():
    from hpc_dgrab.training.combinations import COMPRESSIONS, ORDERS, SYNCS, combination_problem

    refused = 0
    for sync in SYNCS:
        for order in ORDERS:
            for compress in COMPRESSIONS:
                for gradalign in (False, True):
                    problem = combination_problem(sync, order, compress, gradalign)
                    argv = _combination_argv(sync, order, compress, gradalign)
                    if problem is None:
                        _parse(argv)
                    else:
                        refused += 1
                        assert _refusal(argv) == problem
    assert refused > 0


def test_refused_combination_on_the_command_line_is_one_line(digits_shards):
    proc = run_cmd(BASE + ["--data", digits_shards, "--sync", "gossip", "--order", "dgrab"], ranks=2)
    assert_one_line_error(proc, "--order dgrab", "gossip")


@pytest.mark.parametrize("argv, fragment", [
    (["--topology", "nope"], "--topology"),
    (["--local-steps", "3"], "--local-steps"),
    (["--dgrab-mode", "exact"], "--dgrab-mode"),
    (["--order-units", "microbatch:4"], "--order-units"),
    (["--density", "0.1"], "--density"),
    (["--compress", "topk", "--mu", "2"], "--mu"),
    (["--checkpoint-every", "2"], "--checkpoint-every"),
    (["--resume"], "--resume"),
])
def test_flag_that_does_nothing_is_refused(argv, fragment):
    assert _refusal(argv).startswith(fragment)


def test_defaults_given_explicitly_only_count_when_typed():
    cfg = _parse(["--sync", "gossip", "--topology", "ring"])
    assert cfg.topology == "ring" and cfg.density == 0.01 and cfg.mu == 4.0  # defaults, not given: fine
    cfg = _parse(["--compress", "topk", "--density", "0.1"])
    assert cfg.density == 0.1 and cfg.topology == "ring"


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text('model = "mlp"\nbatch-size = 8\nlr = 0.2\nresume = true\ncheckpoint_dir = "ck"\n')
    cfg = _parse(["--config", str(toml), "--lr", "0.01"])
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.resume, cfg.checkpoint_dir) == ("mlp", 8, 0.01, True, "ck")
    toml.write_text('modle = "mlp"\n')
    assert "unknown key 'modle'" in _refusal(["--config", str(toml)])
    toml.write_text('lr = "inf"\n')
    assert "--lr" in _refusal(["--config", str(toml)])
    toml.write_text('topology = "ring"\n')  # a key counts as given: a no-op one is refused too
    assert _refusal(["--config", str(toml)]).startswith("--topology")


def test_config_errors_are_one_line(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("model = \n")
    proc = subprocess.run([sys.executable, "-m", "hpc_dgrab.train", "--data", "x", "--config", str(toml)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert_one_line_error(proc, "not valid TOML")
