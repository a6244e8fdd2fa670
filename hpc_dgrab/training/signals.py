"""Stopping by signal: SIGTERM / SIGUSR1 only set a flag, read by the loop at step boundaries.

:data:`STOP` is the process's flag (the command installs it before anything slow). A stopped job
raises :class:`Preempted` on every rank, carrying the one line to print and the exit code.
"""
from __future__ import annotations

import logging
import signal
from typing import Any, Optional

log = logging.getLogger(__name__)


class StopFlag:
    """SIGTERM / SIGUSR1 set ``signum``; the handler does nothing else."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal API
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


#: the process's stop flag (installed by the command's main before anything slow)
STOP = StopFlag()


class Preempted(Exception):
    """Raised on every rank after a signal stopped the job; ``code`` is the exit code."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(line)
        self.line, self.code = line, code
