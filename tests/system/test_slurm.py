"""The slurm/ templates and srun launching, on a real one-node Slurm started by ``launch/slurm-local``.

Each test submits real jobs (sbatch / srun) and checks what they leave behind: metrics, logs,
exit codes (a job cancelled while pending also ends with exit 0, so outputs are checked too).
Skipped, with the reason, only where this machine cannot run Slurm: not root, or the Debian
packages cannot be installed.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from hpc_dgrab.metrics import read_jsonl
from tests.helpers import ROOT, assert_one_line_error

SLURM_LOCAL = os.path.join(ROOT, "launch", "slurm-local")
SBATCH_DIR = os.path.join(ROOT, "slurm")
#: a tiny synchronous run: digits, logistic regression, 2 ranks (4 shards, 2 per rank)
TINY = ["--model", "logreg", "--batch-size", "16", "--lr", "0.05", "--seed", "1"]
COMPARED = ("epoch", "train_loss", "val_loss", "val_acc", "steps")


@pytest.fixture(scope="session")
def slurm():
    """The environment for Slurm commands. Starts the local Slurm for this session (``--for`` its
    pid); at the end stops it only if a test session started it and no other one still uses it."""
    if os.geteuid() != 0:
        pytest.skip("launch/slurm-local needs root (it installs Debian packages and starts daemons)")
    holder = ["--for", str(os.getpid())]
    proc = subprocess.run([SLURM_LOCAL, "start"] + holder, capture_output=True, text=True, timeout=900)
    if proc.returncode == 4:
        pytest.skip("Slurm packages cannot be installed here: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    conf = subprocess.run([SLURM_LOCAL, "env"], capture_output=True, text=True, check=True).stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["SLURM_CONF"] = conf.strip().split("=", 1)[1]
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    if sys.prefix != sys.base_prefix:  # the templates activate this venv (HPC_DGRAB_ENV) and call its python
        env["HPC_DGRAB_ENV"] = sys.prefix
    else:
        env["PYTHON"] = sys.executable
    yield env
    subprocess.run([SLURM_LOCAL, "stop"] + holder, capture_output=True, timeout=120)


class Job:
    """``sbatch --parsable [--wait] OPTS slurm/SCRIPT ARGS`` submitted in ``cwd``; ``id`` is known
    at once (sbatch prints it at submission), :meth:`finish` waits for the job's end."""

    def __init__(self, slurm, cwd, script, *args, opts=(), wait=True):
        cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + list(opts)
        cmd += [os.path.join(SBATCH_DIR, script)] + [str(a) for a in args]
        self.slurm = slurm
        self.popen = subprocess.Popen(cmd, cwd=cwd, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
        self.id = self.popen.stdout.readline().strip().split(";")[0]
        assert self.id.isdigit(), self.popen.communicate()

    def running(self):
        return self.popen.poll() is None

    def finish(self, timeout=240):
        """Wait for sbatch (and so the job) to end; returns the completed process."""
        try:
            out, err = self.popen.communicate(timeout=timeout)
        finally:
            if self.popen.poll() is None:
                subprocess.run(["scancel", self.id], env=self.slurm)
                self.popen.kill()
        return subprocess.CompletedProcess(self.popen.args, self.popen.returncode, out, err)


def sbatch(slurm, cwd, script, *args, opts=()):
    """Run a job to its end: (completed ``sbatch --wait``, job id)."""
    job = Job(slurm, cwd, script, *args, opts=opts)
    return job.finish(), job.id


def metrics(path):
    return read_jsonl(str(path))


def read(path):
    with open(path) as fh:
        return fh.read()


def assert_same_run(got, want):
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for a, b in zip(got, want):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), (key, a, b)


@pytest.fixture(scope="module")
def straight(slurm, digits_shards, tmp_path_factory):
    """One uninterrupted ``sbatch --wait slurm/train.sbatch`` job (3 epochs): (process, job id, dir)."""
    cwd = tmp_path_factory.mktemp("straight")
    proc, job = sbatch(slurm, cwd, "train.sbatch", "--data", digits_shards, "--epochs", 3, *TINY)
    return proc, job, cwd


def test_srun_info_four_ranks(slurm):
    proc = subprocess.run(["srun", "-n", "4", sys.executable, "-m", "hpc_dgrab.info", "--compact"],
                          env=slurm, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    infos = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [i["rank"] for i in infos] == [0, 1, 2, 3]
    assert {i["size"] for i in infos} == {4} and {i["launcher"] for i in infos} == {"srun"}
    jobs = {i["slurm_job_id"] for i in infos}
    assert len(jobs) == 1 and jobs.pop().isdigit()
    assert [i["slurm"]["procid"] for i in infos] == [0, 1, 2, 3]  # srun's task ids agree with MPI's ranks
    assert {i["slurm"]["ntasks"] for i in infos} == {4}


def test_train_batch_job_leaves_metrics(straight):
    proc, job, cwd = straight
    assert proc.returncode == 0, proc.stderr
    log = read(cwd / f"train-{job}.log")
    assert "SLURM_RESTART_COUNT=0" in log and "exit 0" in log, log
    recs = metrics(cwd / "runs" / "slurm" / f"train-{job}" / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert recs[-1]["ranks"] == 2
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] and recs[-1]["val_acc"] > 0.8
    ckpt = json.loads(read(cwd / "runs" / "slurm" / f"train-{job}" / "checkpoints" / "latest.json"))
    assert ckpt["position"] == {"epoch": 3, "step": 0}


def signal_after_first_epoch(slurm, cwd, data, name, scancel_opts):
    """Submit a 3-epoch train.sbatch job whose rank 1 sleeps 50x its step time (a sleeping
    straggler does not change the numbers), wait until its first epoch is in the metrics (two more
    epochs of several seconds each remain: the signal cannot come too late), ``scancel OPTS`` it,
    and wait for its end: (job, process)."""
    job = Job(slurm, cwd, "train.sbatch", "--data", data, "--epochs", 3, "--straggler", "1:50", *TINY,
              opts=[f"--job-name={name}"])
    path = cwd / "runs" / "slurm" / f"{name}-{job.id}" / "metrics.jsonl"
    try:
        while not (path.exists() and metrics(path)):
            assert job.running(), job.finish()
            time.sleep(0.2)
        sig = subprocess.run(["scancel"] + scancel_opts + [job.id], env=slurm, capture_output=True, text=True)
        assert sig.returncode == 0, sig.stderr
    finally:
        proc = job.finish()
    return job, proc


@pytest.mark.timeout(300)
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_numbers(slurm, straight, digits_shards, tmp_path):
    """USR1 to the batch shell mid-run: checkpoint, exit 75, requeue, resume; the same numbers as
    the uninterrupted job."""
    want = metrics(straight[2] / "runs" / "slurm" / f"train-{straight[1]}" / "metrics.jsonl")
    job, proc = signal_after_first_epoch(slurm, tmp_path, digits_shards, "pre", ["--signal=USR1", "--batch"])
    path = tmp_path / "runs" / "slurm" / f"pre-{job.id}" / "metrics.jsonl"
    log = read(tmp_path / f"pre-{job.id}.log")
    assert proc.returncode == 0, log
    assert "stopped by SIGUSR1 at epoch" in log, log
    assert f"requeueing job {job.id}" in log, log
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log
    assert "resuming from" in log and log.rstrip().endswith("exit 0"), log
    assert_same_run(metrics(path), want)


@pytest.mark.timeout(300)
def test_cancelled_job_checkpoints_and_is_not_requeued(slurm, digits_shards, tmp_path):
    """scancel mid-run: the ranks checkpoint after the TERM, the template does not requeue. (sbatch
    --wait of a cancelled job returns 0 at once, so wait until the job has left the queue.)"""
    job, _ = signal_after_first_epoch(slurm, tmp_path, digits_shards, "cx", [])
    for _ in range(600):
        queue = subprocess.run(["squeue", "-h", "-j", job.id], env=slurm, capture_output=True, text=True)
        if not queue.stdout.strip():
            break
        time.sleep(0.2)
    log = read(tmp_path / f"cx-{job.id}.log")
    # the ranks get TERM from Slurm and USR1 from the batch shell: either may come first
    assert "stopped by SIG" in log and "not requeueing" in log, log
    assert "SLURM_RESTART_COUNT=1" not in log, log
    ckpt = json.loads(read(tmp_path / "runs" / "slurm" / f"cx-{job.id}" / "checkpoints" / "latest.json"))
    assert ckpt["position"]["epoch"] >= 1


def test_mpirun_variant_same_numbers(slurm, straight, digits_shards, tmp_path):
    want = metrics(straight[2] / "runs" / "slurm" / f"train-{straight[1]}" / "metrics.jsonl")
    proc, job = sbatch(slurm, tmp_path, "train-mpirun.sbatch", "--data", digits_shards, "--epochs", 3, *TINY)
    assert proc.returncode == 0, read(tmp_path / f"train-mpirun-{job}.log")
    got = metrics(tmp_path / "runs" / "slurm" / f"train-mpirun-{job}" / "metrics.jsonl")
    assert {r["ranks"] for r in got} == {2}  # two ranks, although SLURM_PROCID is 0 on both
    assert_same_run(got, want)


def test_sweep_array_runs_every_task(slurm, digits_shards, tmp_path):
    proc, job = sbatch(slurm, tmp_path, "sweep.sbatch", "--data", digits_shards, "--epochs", 1, *TINY,
                       opts=["--ntasks-per-node=1"])
    assert proc.returncode == 0, proc.stderr
    seen = {}
    for task in range(4):
        log = read(tmp_path / f"sweep-{job}_{task}.log")
        summary = [ln for ln in log.splitlines() if ln.startswith("summary:")]
        assert len(summary) == 1, log
        seen[task] = summary[0]
    grid = [(o, c) for o in ("rr", "grab") for c in ("none", "topk")]
    for task, (order, compress) in enumerate(grid):
        assert f"--order {order}, --compress {compress}" in seen[task]
        recs = metrics(tmp_path / "runs" / "sweep" / f"sweep-{job}" / f"{order}-{compress}" / "metrics.jsonl")
        assert [r["epoch"] for r in recs] == [1]
    none = metrics(tmp_path / "runs" / "sweep" / f"sweep-{job}" / "rr-none" / "metrics.jsonl")[0]
    topk = metrics(tmp_path / "runs" / "sweep" / f"sweep-{job}" / "rr-topk" / "metrics.jsonl")[0]
    assert topk["comm_bytes"] < none["comm_bytes"]  # the compressor really was applied


def test_shard_job_then_dependent_training(slurm, tmp_path):
    out = tmp_path / "digits-2"
    shard_job = Job(slurm, tmp_path, "shard.sbatch", "digits", "--out", out, "--shards", 2, wait=False).id
    proc, job = sbatch(slurm, tmp_path, "train.sbatch", "--data", out, "--epochs", 1, *TINY,
                       opts=[f"--dependency=afterok:{shard_job}"])
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in read(tmp_path / f"shard-{shard_job}.log")
    assert json.loads(read(out / "manifest.json"))
    recs = metrics(tmp_path / "runs" / "slurm" / f"train-{job}" / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [1] and recs[0]["ranks"] == 2


@pytest.mark.parametrize("args, fragment", [
    ([], "--data"),
    (["--data", "{missing}"], "{missing}"),
])
def test_bad_input_fails_the_job_with_one_error_line(slurm, tmp_path, args, fragment):
    missing = str(tmp_path / "no" / "shards")
    args = [a.format(missing=missing) for a in args]
    proc, job = sbatch(slurm, tmp_path, "train.sbatch", "--epochs", 1, *args, *TINY)
    log = read(tmp_path / f"train-{job}.log")
    assert proc.returncode == 2, log
    as_stderr = subprocess.CompletedProcess([], proc.returncode, "", log)
    assert_one_line_error(as_stderr, fragment.format(missing=missing))
    assert not os.path.exists(tmp_path / "runs" / "slurm" / f"train-{job}" / "metrics.jsonl")
