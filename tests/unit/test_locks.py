"""One job per output, within one process: a second hold fails naming the owner, release is idempotent
(across processes: tests/system/test_locks_process.py)."""
import os
import socket

import pytest

from hpc_dgrab import locks
from hpc_dgrab.errors import UserError


def test_in_process_second_hold_and_release(tmp_path):
    metrics = str(tmp_path / "m.jsonl")
    lock = locks.hold(metrics, "metrics file")
    assert lock.lock_file == metrics + ".lock"
    with pytest.raises(UserError) as info:
        locks.hold(metrics, "metrics file")
    assert str(info.value) == f"metrics file {metrics} is in use by host {socket.gethostname()} pid {os.getpid()}"
    lock.release()
    lock.release()  # idempotent
    locks.hold(metrics, "metrics file").release()
