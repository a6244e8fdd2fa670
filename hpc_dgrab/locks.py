"""One job per output: an exclusive ``flock`` on a lock file beside a checkpoint directory or a
metrics file, held until released or until the process ends (also by SIGKILL or a node crash that
ends the process: the kernel drops the lock with the process's open files).

Lock files: ``DIR/.lock`` for a directory, ``FILE.lock`` for a file. While held, the lock file
holds its owner as JSON (``host``, ``pid``, ``slurm_job``); a second holder gets one line::

    UserError: checkpoint directory runs/ck is in use by host n01 pid 4242 (Slurm job 981)

The lock file itself is never deleted (deleting a lock file races with the next locker); it is
emptied on :meth:`JobLock.release`. In an MPI job only one rank (rank 0) should hold a given lock.
``flock`` works on local file systems and on NFS (Linux emulates it with POSIX locks there); on
Lustre the file system must be mounted with ``-o flock``.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from typing import Any, Dict, Optional, Set

from hpc_dgrab import runtime
from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)

#: locks this process holds, so that dropping the last reference does not release one
_HELD: Set[JobLock] = set()


def lock_path(path: str, directory: Optional[bool] = None) -> str:
    """The lock file of ``path``: ``path/.lock`` for a directory, ``path.lock`` for a file.

    ``directory=None`` decides by what is on disk (an existing directory, else a file).
    """
    if directory is None:
        directory = os.path.isdir(path)
    return os.path.join(path, ".lock") if directory else path + ".lock"


def _owner() -> Dict[str, Any]:
    slurm = runtime.SlurmInfo.from_env()
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": slurm.job_id if slurm else None}


def _describe(owner: Optional[Dict[str, Any]]) -> str:
    if not owner:
        return "another process (its owner record is not written yet)"
    text = f"host {owner.get('host', '?')} pid {owner.get('pid', '?')}"
    if owner.get("slurm_job"):
        text += f" (Slurm job {owner['slurm_job']})"
    return text


def read_owner(lock_file: str) -> Optional[Dict[str, Any]]:
    """The owner recorded in ``lock_file`` (None when empty, absent or unreadable)."""
    try:
        with open(lock_file) as fh:
            data = json.loads(fh.read() or "null")
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


class JobLock:
    """An exclusive lock held by this process; see :func:`hold`. A context manager."""

    def __init__(self, path: str, what: str, lock_file: str, fd: int) -> None:
        self.path = path
        self.what = what
        self.lock_file = lock_file
        self._fd: Optional[int] = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empty the owner record and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing the only descriptor releases the flock
        self._fd = None
        _HELD.discard(self)
        log.debug("released %s", self.lock_file)

    def __enter__(self) -> JobLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"JobLock({self.lock_file!r}, held={self.held})"


def hold(path: str, what: str, directory: Optional[bool] = None) -> JobLock:
    """Take the exclusive lock of ``path`` (a checkpoint directory or a metrics file) for this job.

    ``what`` names the thing in the error (e.g. ``"checkpoint directory"``, ``"metrics file"``);
    ``directory`` says whether ``path`` is a directory (created if missing) — by default, whether it
    is one on disk. Raises :class:`UserError` ``"<what> <path> is in use by host H pid P (Slurm job
    J)"`` when another process holds it, also another lock of the same path in this process.
    """
    if directory is None:
        directory = os.path.isdir(path)
    lock_file = lock_path(path, directory)
    try:
        os.makedirs(path if directory else (os.path.dirname(os.path.abspath(path))), exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot create lock file {lock_file}: "
                        f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"{what} {path} is in use by {_describe(read_owner(lock_file))}") from None
        raise UserError(f"{what} {path}: cannot lock {lock_file}: {exc.strerror or exc}") from None
    record = (json.dumps(_owner()) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    lock = JobLock(path, what, lock_file, fd)
    _HELD.add(lock)
    log.debug("holding %s", lock_file)
    return lock
