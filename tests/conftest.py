"""Fixtures shared by every lane (helpers are in tests/helpers.py), and the lane rules: MPI tests
live in tests/mpi/, and a test in tests/unit/ may not start a process."""
from __future__ import annotations

import os
import platform
import subprocess

import pytest

LANES = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        lane = os.path.relpath(str(item.path), LANES).split(os.sep)[0]
        if item.get_closest_marker("mpi") is not None and lane not in ("mpi", "gpu"):
            raise pytest.UsageError(f"{item.nodeid}: an MPI test belongs in tests/mpi/")


@pytest.fixture(autouse=True)
def _unit_lane_starts_no_process(request, monkeypatch):
    """tests/unit/ is the fast lane: starting a subprocess there fails the test (move it to system/)."""
    if os.path.relpath(str(request.node.path), LANES).split(os.sep)[0] == "unit":
        platform.processor()   # cached by the standard library; h5py's import asks it (`uname -p`)

        def refuse(*args, **kwargs):
            raise AssertionError("tests/unit/ starts no process: move this test to tests/system/")
        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    """Digits sharded 4 ways (iid), written once per test session."""
    from hpc_dgrab.data import ensure_shards

    out = str(tmp_path_factory.mktemp("shards") / "digits-4")
    ensure_shards("digits", out, shards=4, partition="iid", seed=0)
    return out
