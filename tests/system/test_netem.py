"""launch/netem: emulated hosts leave nothing behind, shaped links obey the link arithmetic, and a
job across two emulated hosts computes what the same job computes on one machine.

Needs root, iproute2 (ip, tc), util-linux (nsenter, unshare), Open MPI and network namespaces;
skipped with the reason otherwise, and skipped when an emulation is already up (these tests do
not tear down someone else's hosts).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, run_cmd

NETEM = os.path.join(ROOT, "launch", "netem")
PREFIX = "hdnetem-"


def _netns() -> list:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def _why_not() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", "nsenter", "unshare", "mpirun"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install iproute2 util-linux openmpi-bin)"
    if any(n.startswith(PREFIX) for n in _netns()):
        return "an emulation is already up (launch/netem status); not touching it"
    probe = "hdnetem-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces unsupported here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


REASON = _why_not()
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON)


def netem(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_cmd([NETEM, *args], timeout=timeout)


@pytest.fixture
def hosts():
    """Brings hosts up with ``hosts(N, *flags)``; always runs ``down`` afterwards."""
    def up(n: int, *flags: str) -> subprocess.CompletedProcess:
        proc = netem("up", str(n), *flags)
        assert proc.returncode == 0, proc.stderr
        return proc

    try:
        yield up
    finally:
        netem("down")


def _footprint() -> dict:
    """Everything of the host that the harness could leave behind."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    with open("/etc/hosts") as fh:
        etc_hosts = fh.read()
    cgroups = sorted(n for root in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup") if os.path.isdir(root)
                     for n in os.listdir(root) if n.startswith(PREFIX))
    return {"netns": _netns(), "links": sorted(ln.split(":")[1].strip() for ln in links.splitlines()),
            "etc_hosts": etc_hosts, "cgroups": cgroups, "state": os.path.exists("/run/hdnetem")}


def test_up_run_down_leaves_nothing(hosts):
    before = _footprint()
    hosts(2, "--rate", "1gbit", "--slow-host", "1:2")
    status = json.loads(netem("status", "--json").stdout)
    assert status["up"] and status["namespaces"] == ["hdnetem-h0", "hdnetem-h1", "hdnetem-sw"]
    # the shaping holds (the lower side depends on how busy the machine's CPUs are: not asserted)
    assert 0 < status["state"]["check"]["ratio"] <= 1.15, status["state"]["check"]
    # every rank runs in its host's namespace, with that host's address and name
    show = "echo $(hostname) $(ip -4 -o addr show eth0 | awk '{print $4}')"
    proc = netem("run", "-n", "2", "--", "sh", "-c", show)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split("\n")[:2]) == ["hdnetem-h0 10.231.0.1/24", "hdnetem-h1 10.231.0.2/24"]
    # nothing in the machine's own network namespace changed while up
    assert _footprint()["links"] == before["links"]
    again = netem("up", "2", "--rate", "1gbit", "--slow-host", "1:2", "--no-check")   # idempotent
    assert again.returncode == 0 and "already up" in again.stderr, again.stderr
    assert netem("down").returncode == 0
    assert _footprint() == before
    assert netem("down").returncode == 0          # nothing to remove is fine
    assert _footprint() == before


def test_failed_up_and_bad_input_leave_nothing():
    before = _footprint()
    bad = [(["2", "--rate", "fast"], "rate"), (["2", "--rate", "1gbit", "--slow-host", "5:2"], "--slow-host")]
    for flags, fragment in bad:
        proc = netem("up", *flags)
        assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
        assert _footprint() == before
    # --delay needs the netem qdisc: where the kernel lacks it, `up` fails half-way and tears down
    proc = netem("up", "2", "--rate", "1gbit", "--delay", "1ms", "--no-check")
    if proc.returncode == 0:
        assert netem("down").returncode == 0
    else:
        assert "netem qdisc" in proc.stderr, proc.stderr
    assert _footprint() == before
    run = netem("run", "--", "true")
    assert run.returncode == 2 and "not up" in run.stderr


ALLREDUCE = r"""
import json, sys, time
import numpy as np, torch
from mpi4py import MPI
comm = MPI.COMM_WORLD
t = torch.ones(int(sys.argv[1]), dtype=torch.float32)
times = []
for _ in range(3):
    comm.Barrier(); t0 = time.perf_counter()
    comm.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM); times.append(time.perf_counter() - t0)
assert float(t[0]) == 2.0 ** 3 and float(t[-1]) == 2.0 ** 3
if comm.rank == 0:
    print(json.dumps({"best_s": min(times), "times": times}))
"""


def test_shaped_allreduce_matches_link_arithmetic(hosts):
    """16 MiB float32 all-reduce, 2 hosts at 100 Mbit/s, ring algorithm: each rank sends
    2 (n-1)/n x 16 MiB = 16 MiB through its link, 1.34 s; the CPU part (~0.07 s unshaped) is small.
    This checks the emulated link, so it runs MPI_Allreduce on the world alone: in a process that
    has created a second communicator (every transport works on a Dup) the same all-reduce takes
    ~1.9-2.7 s here, an interaction of Open MPI's TCP traffic with the tc shaping, not of the link."""
    rate, numel = 100e6, 4 << 20
    hosts(2, "--rate", "100mbit")
    proc = netem("run", "-n", "2", "--mca", "coll_tuned_use_dynamic_rules", "1",
                 "--mca", "coll_tuned_allreduce_algorithm", "4", "--",
                 sys.executable, "-c", ALLREDUCE, str(numel), timeout=120)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["best_s"]
    n = 2
    predicted = 2 * (n - 1) / n * numel * 4 * 8 / rate
    assert abs(measured - predicted) / predicted < 0.30, (measured, predicted)


def test_two_host_training_equals_one_host(hosts, digits_shards, tmp_path):
    """The same 2-rank synchronous run (logreg on digits, 1 epoch) over two emulated hosts and on
    one machine (shared memory): the same losses and accuracy, to 1e-12."""
    train = ["-m", "hpc_dgrab.train", "--data", digits_shards, "--model", "logreg", "--epochs", "1",
             "--lr", "0.05", "--batch-size", "16", "--seed", "3", "--sync", "allreduce", "--progress", "off"]
    local = run_cmd(train + ["--metrics", str(tmp_path / "local.jsonl")], ranks=2, timeout=120)
    assert local.returncode == 0, local.stderr
    hosts(2, "--rate", "1gbit", "--no-check")
    remote = netem("run", "-n", "2", "--", sys.executable, *train, "--metrics", str(tmp_path / "netem.jsonl"),
                   timeout=120)
    assert remote.returncode == 0, remote.stderr
    recs = [json.loads(open(tmp_path / f).read().splitlines()[-1]) for f in ("local.jsonl", "netem.jsonl")]
    for key in ("train_loss", "val_loss", "val_acc"):
        assert recs[1][key] == pytest.approx(recs[0][key], rel=1e-12, abs=1e-12), key
    assert recs[1]["comm_bytes"] == recs[0]["comm_bytes"] > 0
