"""Stopping by signal: SIGTERM / SIGUSR1 only set a flag, read by the loop at step boundaries.

The first such signal sets the flag and makes the process ignore both signals from then on: a
second one (a batch system's repeated warning, a second ``kill``) arriving while the job drains,
checkpoints or exits is ignored, never fatal (Python restores default handlers while the
interpreter shuts down, but keeps ignored ones), so the exit code stays 75.

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
        if self.signum is None:
            self.signum = signum
        for sig in self.SIGNALS:   # later signals: ignored while stopping and exiting
            signal.signal(sig, signal.SIG_IGN)

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
