"""One job per output across processes: a second process gets a one-line error naming the owner; a
lock dies with its process (SIGKILL), so the next job can take it."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from hpc_dgrab import locks
from hpc_dgrab.errors import UserError
from tests.helpers import ROOT, assert_one_line_error

HOLDER = ("import sys; from hpc_dgrab import locks; "
          "lock = locks.hold(sys.argv[1], 'checkpoint directory', directory=True); "
          "print('held', flush=True); sys.stdin.read()")
TAKER = ("import sys; from hpc_dgrab.cli import run_main; from hpc_dgrab import locks; "
         "run_main(lambda argv: locks.hold(argv[0], 'checkpoint directory', directory=True) and 0)")


def env(**extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    e.update(extra)
    return e


def test_second_process_fails_until_the_first_is_killed(tmp_path):
    d = str(tmp_path / "ck")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, d], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env(SLURM_JOB_ID="4711"))
    try:
        assert holder.stdout.readline() == "held\n"  # the lock is taken before this line is printed
        proc = subprocess.run([sys.executable, "-c", TAKER, d], capture_output=True, text=True, env=env(),
                              timeout=60)
        line = assert_one_line_error(proc)
        assert line == (f"error: checkpoint directory {d} is in use by host {socket.gethostname()} "
                        f"pid {holder.pid} (Slurm job 4711)"), line
        assert proc.returncode == 2
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            locks.hold(d, "checkpoint directory")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        holder.stdin.close()
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL
    with locks.hold(d, "checkpoint directory") as lock:  # free again after the holder died
        assert lock.held and lock.lock_file == os.path.join(d, ".lock")
        assert locks.read_owner(lock.lock_file)["pid"] == os.getpid()
    assert not lock.held and locks.read_owner(lock.lock_file) is None
