"""The user-facing examples run as documented (2 ranks under launch/local) on tiny digits shards."""
import re

import pytest

from tests.helpers import run_cmd

pytestmark = pytest.mark.slow


def _numbers(line):
    return [float(v) for v in re.findall(r"[-+]?\d+\.\d+", line)]


def test_own_model_regtopk(digits_shards):
    proc = run_cmd(["examples/own_model.py", "--data", digits_shards, "--epochs", "2", "--lr", "0.1"],
                   ranks=2)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 2, proc.stdout
    losses = [_numbers(ln)[0] for ln in lines]
    assert losses[1] < losses[0] < 2.5          # learning, from about ln(10)
    assert _numbers(lines[1])[1] > _numbers(lines[0])[1] > 0   # bytes sent grow


@pytest.mark.parametrize("order", ["dgrab", "rr"])
def test_dgrab_sampler(digits_shards, order):
    proc = run_cmd(["examples/dgrab_sampler.py", "--data", digits_shards, "--epochs", "2", "--order", order],
                   ranks=2)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 2 and f"({order})" in lines[0], proc.stdout
    assert _numbers(lines[1])[1] > 0.8           # val accuracy well above chance (0.1)


def test_gossip(digits_shards):
    proc = run_cmd(["examples/gossip.py", "--data", digits_shards, "--epochs", "2"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("network average"), proc.stdout
    assert _numbers(last)[1] > 0.3               # asynchronous: timing-dependent, but far above chance
