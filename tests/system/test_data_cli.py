"""``python -m hpc_dgrab.data``: shard/inspect output, and one-line errors that leave nothing behind."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "hpc_dgrab.data", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def make_npz(path, n=120, classes=4):
    x = np.random.default_rng(0).integers(0, 256, size=(n, 1, 3, 3), dtype=np.uint8)
    np.savez(path, x=x, y=(np.arange(n) % classes).astype(np.int64))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    make_npz(str(base / "toy.npz"))
    out = str(base / "shards")
    proc = run("shard", str(base / "toy.npz"), "--out", out, "--shards", "2", "--partition", "by-class",
               "--val-fraction", "0.25", "--compression", "lzf")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}: 2 shards, 88 training + 32 validation examples")
    return out


def copy_of(shard_dir, tmp_path):
    import shutil
    dst = str(tmp_path / "copy")
    shutil.copytree(shard_dir, dst)
    return dst


def test_inspect_prints_counts_and_class_balance(shard_dir):
    proc = run("inspect", shard_dir, "--verify")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    # 30 examples per class, round(0.25 * 30) = 8 held out; by-class over 2 shards: {0, 1} and {2, 3}
    assert rows["file"] == ["file", "examples", "MiB", "classes", "max", "share", "min", "share",
                            "c0", "c1", "c2", "c3"]
    s0, s1, val = rows["shard-00000.h5"], rows["shard-00001.h5"], rows["val.h5"]
    assert s0[1] == "44" and s0[3] == "2" and s0[-4:] == ["22", "22", "0", "0"]
    assert s1[1] == "44" and s1[3] == "2" and s1[-4:] == ["0", "0", "22", "22"]
    assert val[1] == "32" and val[-4:] == ["8", "8", "8", "8"]
    assert rows["total"][2] == "88"
    assert "verified sha256, shapes, labels and counts of 3 files: ok" in proc.stdout


def test_shard_help_documents_validation_rule():
    proc = run("shard", "--help")
    assert proc.returncode == 0
    assert "official test split" in proc.stdout and "default 0.1" in proc.stdout


@pytest.mark.parametrize("args,fragments", [
    (["shard", "{tmp}/nope.npz", "--out", "{tmp}/out", "--shards", "2"], ["nope.npz: no such file"]),
    (["shard", "imagenet", "--out", "{tmp}/out", "--shards", "2"], ["unknown data source 'imagenet'"]),
    (["shard", "digits", "--out", "{tmp}/out", "--shards", "2", "--partition", "dirichlet:-1"],
     ["ALPHA must be a positive number"]),
    (["shard", "digits", "--out", "{tmp}/out", "--shards", "2", "--val-fraction", "1.5"],
     ["--val-fraction: must be in (0, 1)"]),
    (["shard", "digits", "--out", "{tmp}/out", "--shards", "0"], ["--shards"]),
    (["shard", "{tmp}/mismatch.npz", "--out", "{tmp}/out", "--shards", "2"],
     ["mismatch.npz: x has 10 examples but y has 9"]),
    (["shard", "{tmp}/small.npz", "--out", "{tmp}/out", "--shards", "200"],
     ["leaves shard 108 of 200 empty"]),
    (["inspect", "{tmp}/missing"], ["missing: no such shard directory"]),
    (["shard", "{tmp}/nan.npz", "--out", "{tmp}/out", "--shards", "2"],
     ["nan.npz: x holds 2 non-finite value(s) (nan), the first in example 7"]),
    (["shard", "{tmp}/inf.npz", "--out", "{tmp}/out", "--shards", "2"],
     ["inf.npz: x holds 2 non-finite value(s) (inf/nan), the first in example 3"]),
])
def test_bad_input_one_line_nothing_written(tmp_path, args, fragments):
    np.savez(tmp_path / "mismatch.npz", x=np.zeros((10, 2)), y=np.zeros(9, dtype=np.int64))
    x = np.ones((40, 1, 2, 2), dtype=np.float32)
    x[7, 0, 1, 1] = x[20, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(40) % 2)
    x = np.ones((40, 3))
    x[3, 2], x[30, 0] = -np.inf, np.nan
    np.savez(tmp_path / "inf.npz", x=x, y=np.arange(40) % 2)
    make_npz(str(tmp_path / "small.npz"))  # 120 examples, 108 after the 0.1 holdout
    before = sorted(os.listdir(tmp_path))
    proc = run(*[a.format(tmp=tmp_path) for a in args])
    assert_user_error(proc, *fragments)
    assert sorted(os.listdir(tmp_path)) == before  # no output directory, no temporary directory


def test_refuses_to_overwrite_other_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    proc = run("shard", "digits", "--out", str(out), "--shards", "2")
    assert_user_error(proc, f"{out}: exists and is not a shard directory")
    assert os.listdir(out) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["mine"]


def test_inspect_missing_truncated_corrupt_and_unknown_version(shard_dir, tmp_path):
    d = copy_of(shard_dir, tmp_path)
    os.rename(os.path.join(d, "shard-00001.h5"), os.path.join(d, "moved.h5"))
    assert_user_error(run("inspect", d), "shard-00001.h5: missing shard file")
    os.rename(os.path.join(d, "moved.h5"), os.path.join(d, "shard-00001.h5"))
    file = os.path.join(d, "val.h5")
    data = open(file, "rb").read()
    open(file, "wb").write(data[:-100])
    assert_user_error(run("inspect", d), "val.h5: truncated shard file")
    open(file, "wb").write(data[:-100] + bytes(100))
    assert run("inspect", d).returncode == 0
    assert_user_error(run("inspect", d, "--verify"), "val.h5: sha256 mismatch")
    open(file, "wb").write(data)
    manifest = os.path.join(d, "manifest.json")
    m = json.load(open(manifest))
    m["version"] = 2
    json.dump(m, open(manifest, "w"))
    assert_user_error(run("inspect", d), "manifest.json: unknown manifest version 2")


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupt_leaves_nothing(tmp_path, shard_dir, signame, existing):
    """The signal arrives, every time, after the second of four shard files is written (fault
    injection: the writer signals itself there), so the interrupt path is what is tested: exit 130,
    no temporary directory, and an older shard directory at --out is left as it was."""
    make_npz(str(tmp_path / "toy.npz"))
    out = tmp_path / "out"
    if existing:
        import shutil
        shutil.copytree(shard_dir, out)
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} if existing else None
    env = dict(os.environ, HPC_DGRAB_FAULT=f"shards.file#2:{signame}")
    # a job started in the background by a non-interactive shell inherits SIGINT ignored (so would
    # the child, and then finish undisturbed): start it with SIGINT at its default, as a terminal does
    proc = subprocess.run([sys.executable, "-m", "hpc_dgrab.data", "shard", str(tmp_path / "toy.npz"),
                           "--out", str(out), "--shards", "4"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130 and proc.stderr.strip() == "error: interrupted", proc.stderr
    assert sorted(os.listdir(tmp_path)) == (["out", "toy.npz"] if existing else ["toy.npz"])
    if existing:
        assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before
    # the same command without the fault completes
    proc = run("shard", str(tmp_path / "toy.npz"), "--out", str(out), "--shards", "4")
    assert proc.returncode == 0 and sorted(os.listdir(out))[:2] == ["manifest.json", "shard-00000.h5"], proc.stderr
