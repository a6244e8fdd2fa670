"""Shared test helpers: run the package's commands under mpirun in a subprocess, with a timeout."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import List

import pytest

from hpc_dgrab import procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cmd(args: List[str], ranks: int = 1, timeout: float = 300, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` (under ``launch/local -n RANKS`` when RANKS > 1); capture output."""
    cmd = [sys.executable] + list(args)
    if ranks > 1:
        cmd = [os.path.join(ROOT, "launch", "local"), "-n", str(ranks), "--"] + cmd
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return procs.run(cmd, cwd=cwd, env=env, timeout=timeout)   # a timeout kills the whole process group


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with exactly one ``error: ...`` line on stderr (and no traceback)."""
    assert proc.returncode != 0, proc
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    """Digits sharded 4 ways (iid), written once per test session."""
    from hpc_dgrab.data import ensure_shards

    out = str(tmp_path_factory.mktemp("shards") / "digits-4")
    ensure_shards("digits", out, shards=4, partition="iid", seed=0)
    return out
