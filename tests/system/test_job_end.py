"""One rank's failure ends the whole job (hpc_dgrab.lifecycle), with every rank's exit code checked
(tests/record_exit.py), the one error line, and the time from the failure to the job's end.

A user's own script under ``launch/local -n 2``: rank 1 raises, exits early, or runs fewer steps than
rank 0, while rank 0 waits in ``DistributedOptimizer``'s all-reduce. Before, each of these hung.
The bound on the time to end is generous (the watchdog's grace is 5 s; the bound is 45 s) so that a
loaded CI machine cannot fail it; the launch timeout is what catches a hang.
"""
import os
import time

import pytest

from tests.helpers import run_ranked

SCRIPT = r'''
import os, sys, time, torch
import hpc_dgrab as hd

hd.init()
mode, marks = sys.argv[1], sys.argv[2]
model = torch.nn.Linear(4, 2)
hd.broadcast_parameters(model.state_dict())
opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
steps = 7 if (mode == "uneven" and hd.rank() == 1) else 10
for step in range(steps):
    if step == 5 and hd.rank() == 1 and mode != "uneven":
        with open(os.path.join(marks, "failed-at"), "w") as fh:
            fh.write(str(time.time()))
        if mode == "raise":
            raise RuntimeError("boom at step 5")
        if mode == "exit":
            sys.exit(0)
        if mode == "usererror":
            raise hd.UserError("this rank's input is bad")
    opt.zero_grad()
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
if mode == "uneven" and hd.rank() == 1:
    with open(os.path.join(marks, "failed-at"), "w") as fh:
        fh.write(str(time.time()))
print(f"rank {hd.rank()} done", flush=True)
'''


def _run(tmp_path, mode):
    script = tmp_path / "user.py"
    script.write_text(SCRIPT)
    marks = tmp_path / "marks"
    marks.mkdir()
    run = run_ranked([str(script), mode, str(marks)], ranks=2, workdir=str(tmp_path / "codes"), timeout=240)
    ended = time.time()
    with open(marks / "failed-at") as fh:
        to_end = ended - float(fh.read())
    assert to_end < 45, f"the job took {to_end:.0f} s to end after the failure"
    assert set(run.codes) == {0, 1}, (run.codes, run.proc.stderr)
    return run


def test_uncaught_exception_on_one_rank_ends_every_rank(tmp_path):
    run = _run(tmp_path, "raise")
    assert run.codes[1] == 1                           # the failing rank: exit 1
    assert run.codes[0] != 0                           # the other: ended by the abort, not left waiting
    assert run.proc.returncode == 1
    assert run.proc.stderr.count("Traceback (most recent call last)") == 1   # the traceback once
    assert run.error_lines() == ["error: rank 1: uncaught RuntimeError: boom at step 5; ending the job"]
    assert "done" not in run.proc.stdout


def test_user_error_on_one_rank_is_one_line_and_exit_2(tmp_path):
    run = _run(tmp_path, "usererror")
    assert run.codes[1] == 2 and run.codes[0] != 0 and run.proc.returncode == 2
    assert "Traceback" not in run.proc.stderr
    assert run.error_lines() == ["error: rank 1: this rank's input is bad"]


@pytest.mark.parametrize("mode", ["exit", "uneven"])
def test_rank_leaving_early_ends_the_ranks_left_waiting(tmp_path, mode):
    # rank 1 leaves (sys.exit(0) at step 5, or the end of the script after 7 of rank 0's 10 steps)
    run = _run(tmp_path, mode)
    assert run.codes[0] == 1, (run.codes, run.proc.stderr)   # the waiting rank: a clear error, exit 1
    assert run.codes[1] != 1                           # the rank that left did not fail
    assert run.proc.returncode != 0
    assert run.error_lines() == [
        "error: rank 0: rank 1 has exited while this rank waits in an hpc_dgrab collective (5 s); every rank "
        "must make the same collective calls, e.g. the same number of optimizer steps; ending the job"]
    assert "rank 0 done" not in run.proc.stdout


def test_watchdog_off_leaves_a_normal_job_alone(tmp_path):
    # ranks that end together never trip the watchdog (both print "done", both exit 0)
    script = tmp_path / "user.py"
    script.write_text(SCRIPT)
    run = run_ranked([str(script), "none", str(tmp_path)], ranks=2, workdir=str(tmp_path / "codes"),
                     timeout=240)
    assert run.codes == {0: 0, 1: 0} and run.proc.returncode == 0, run.proc.stderr
    assert sorted(run.proc.stdout.split("\n")[:2]) == ["rank 0 done", "rank 1 done"]
    assert not run.error_lines()


# ------------------------------------------------------------ the trainer: bad input, outputs, signals

TRAIN = ["-m", "hpc_dgrab.train", "--model", "logreg", "--lr", "0.05", "--batch-size", "16", "--seed", "1",
         "--progress", "off"]


def test_label_outside_the_classes_in_one_shard_is_exit_2_on_every_rank(digits_shards, tmp_path):
    import json
    import shutil

    import h5py

    from hpc_dgrab.data.shards import sha256_file

    root = tmp_path / "shards"
    shutil.copytree(digits_shards, root)
    path = root / "shard-00003.h5"                     # rank 1's second shard (4 shards on 2 ranks)
    with h5py.File(path, "r+") as f:
        y = f["y"][()]
        y[7] = 42
        f["y"][...] = y
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][3].update(bytes=os.path.getsize(path), sha256=sha256_file(str(path)))  # anyone can
    (root / "manifest.json").write_text(json.dumps(manifest))
    run = run_ranked(TRAIN + ["--data", str(root), "--epochs", "1"], ranks=2, workdir=str(tmp_path / "codes"))
    assert run.codes == {0: 2, 1: 2} and run.proc.returncode == 2, run.proc.stderr
    assert run.error_lines() == [f"error: --data: {path}: label 42 is outside the manifest's 10 classes "
                                 "(0..9) (rank 1)"]
    assert "Traceback" not in run.proc.stderr


def test_unwritable_metrics_is_one_line_on_every_rank_before_the_first_step(digits_shards, tmp_path):
    metrics = tmp_path / "m.jsonl"
    metrics.mkdir()                                     # a directory where the file should go
    run = run_ranked(TRAIN + ["--data", digits_shards, "--epochs", "1", "--metrics", str(metrics)],
                     ranks=2, workdir=str(tmp_path / "codes"))
    assert run.codes == {0: 2, 1: 2} and run.proc.returncode == 2, run.proc.stderr
    assert run.error_lines() == [f"error: --metrics {metrics}: is a directory, not a file (rank 0)"]
    assert "epoch " not in run.proc.stdout             # no step was run


@pytest.mark.slow
@pytest.mark.parametrize("signals", [
    [(0.0, 15)],                # SIGTERM to the launcher (a batch system, `kill`): 75, not mpirun's 1
    [(0.0, 10), (0.2, 10)],     # two SIGUSR1 0.2 s apart: the second, during the stop, is ignored
], ids=["term", "usr1-twice"])
def test_signals_to_the_launcher_end_every_rank_with_75(digits_shards, tmp_path, signals):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    run = run_ranked(TRAIN + ["--data", digits_shards, "--epochs", "500", "--checkpoint-dir", str(ckpt),
                              "--metrics", str(metrics)], ranks=2, workdir=str(tmp_path / "codes"),
                     timeout=240, signals=signals, ready=lambda: metrics.exists())
    assert run.codes == {0: 75, 1: 75} and run.proc.returncode == 75, (run.codes, run.proc.stderr)
    assert len([ln for ln in run.proc.stderr.splitlines() if ln.startswith("stopped by SIGUSR1")]) == 1
    assert any(f.startswith("ckpt-") for f in os.listdir(ckpt))
