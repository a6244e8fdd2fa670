"""Error types shared by every layer (beside :mod:`hpc_dgrab.runtime`, below everything else).

The communication and data layers raise these; the command-line layer (:mod:`hpc_dgrab.cli`)
turns them into one line ``error: ...`` and an exit code. Nothing here imports a higher layer.

Exit codes of the commands: 0 success, 1 internal error, 2 bad input (:class:`UserError`),
75 (``EX_TEMPFAIL``) stopped by SIGTERM/SIGUSR1 after writing a checkpoint (run again with
``--resume``; Slurm templates requeue on it), 130 interrupted (SIGINT).
"""
from __future__ import annotations

from typing import Any, Optional

EXIT_INTERNAL = 1
EXIT_USAGE = 2
#: stopped on request (SIGTERM / SIGUSR1) after a checkpoint: resumable, neither success nor a crash
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A mistake in the user's input; printed as one line ``error: <message>``.

    ``collective=True`` means every rank raises it together (see :func:`agree`), so the ranks can
    exit normally; otherwise a multi-rank job is aborted so that no rank waits forever.
    """

    def __init__(self, message: str, collective: bool = False) -> None:
        super().__init__(message)
        self.collective = collective


class UserValueError(UserError, ValueError):
    """A :class:`UserError` about an argument's value; also a ``ValueError``, which is what
    Horovod raises there (so ``except ValueError`` in a migrated script still catches it)."""


def agree(message: Optional[str], comm: Any = None) -> None:
    """Collective: raise the same :class:`UserError` on every rank if any rank has a message.

    Each rank passes its own problem (or None). The first non-None message in rank order wins,
    prefixed with the rank that found it when the job has more than one rank.
    """
    if comm is None:
        from hpc_dgrab import runtime

        comm = runtime.world()
    messages = comm.allgather(message)
    for rank, msg in enumerate(messages):
        if msg is not None:
            raise UserError(msg if comm.size == 1 else f"{msg} (rank {rank})", collective=True)
