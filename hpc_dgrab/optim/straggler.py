"""An artificial straggler for experiments: ``--straggler RANK:FACTOR[:spin]``.

On rank RANK every training step is made FACTOR times slower: after a step whose *compute* took
``t`` seconds (everything but communication: loading the batch, forward, backward, update) the
rank idles ``(FACTOR - 1) * t`` more. ``sleep`` (default)
releases the core, like a slow node elsewhere in a cluster; ``spin`` busy-waits and keeps the core,
which on an oversubscribed workstation keeps the CPU share of the other ranks what it was without a
straggler (the fair comparison there).

:class:`Straggler` is driver-agnostic (``begin()`` / ``end(comm_seconds)``). The trainer calls it at
ONE point for every driver: ``begin()`` before loading a step's batches, ``end(comm_seconds)``
after the driver's step, with the seconds that step spent communicating (which are not compute).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger(__name__)

MODES = ("sleep", "spin")


@dataclass(frozen=True)
class StragglerSpec:
    """Parsed ``RANK:FACTOR[:MODE]``."""

    rank: int
    factor: float
    mode: str = "sleep"


def parse_straggler(text: str, world_size: Optional[int] = None) -> StragglerSpec:
    """Parse ``RANK:FACTOR[:sleep|spin]``; ``ValueError`` with a one-line reason when malformed."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--straggler: expected RANK:FACTOR[:sleep|spin], got {text!r}")
    try:
        rank = int(parts[0])
        factor = float(parts[1])
    except ValueError:
        raise ValueError(f"--straggler: expected RANK:FACTOR with an integer RANK and a number FACTOR, "
                         f"got {text!r}") from None
    mode = parts[2] if len(parts) == 3 else "sleep"
    if mode not in MODES:
        raise ValueError(f"--straggler: mode must be sleep or spin, got {mode!r}")
    if not factor >= 1.0 or factor == float("inf"):
        raise ValueError(f"--straggler: FACTOR must be a finite number >= 1, got {parts[1]!r}")
    if rank < 0 or (world_size is not None and rank >= world_size):
        bound = f" (this job has ranks 0..{world_size - 1})" if world_size is not None else ""
        raise ValueError(f"--straggler: rank {rank} out of range{bound}")
    return StragglerSpec(rank, factor, mode)


class Straggler:
    """Slows this rank's steps by ``factor`` (1 = no-op); counts the time it idled in ``idle_s``."""

    def __init__(self, factor: float = 1.0, mode: str = "sleep",
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if factor < 1.0:
            raise ValueError(f"straggler factor must be >= 1, got {factor}")
        if mode not in MODES:
            raise ValueError(f"straggler mode must be one of {MODES}, got {mode!r}")
        self.factor, self.mode = float(factor), mode
        self._clock, self._sleep = clock, sleep
        self._t0: Optional[float] = None
        self._comm = 0.0
        self.idle_s = 0.0
        self.steps = 0

    @classmethod
    def for_rank(cls, spec: Optional[StragglerSpec], rank: int) -> Straggler:
        """The straggler of ``rank`` under ``spec`` (a no-op one on every other rank)."""
        if spec is None or spec.rank != rank:
            return cls(1.0)
        log.info("rank %d is a straggler: steps %.3gx slower (%s)", rank, spec.factor, spec.mode)
        return cls(spec.factor, spec.mode)

    @property
    def active(self) -> bool:
        return self.factor > 1.0

    def begin(self, at: Optional[float] = None) -> None:
        """Mark the start of a step's compute (``at``: an earlier clock reading). A no-op while a
        step is already open, so a training loop can open it before loading the batch and the
        driver's own ``begin()`` does not move it."""
        if self._t0 is not None:
            return
        self._t0 = self._clock() if at is None else at
        self._comm = 0.0

    def add_comm(self, seconds: float) -> None:
        """Exclude ``seconds`` spent communicating in the current step from its compute time."""
        self._comm += seconds

    def end(self, comm_seconds: float = 0.0) -> float:
        """End the step: idle ``(factor - 1) * compute`` seconds; returns the idle time."""
        if self._t0 is None:
            return 0.0
        if not self.active:
            self._t0 = None
            return 0.0
        compute = max(0.0, self._clock() - self._t0 - self._comm - comm_seconds)
        self._t0 = None
        delay = (self.factor - 1.0) * compute
        self.idle(delay)
        self.steps += 1
        return delay

    def idle(self, seconds: float) -> None:
        """Sleep or spin for ``seconds``."""
        if seconds <= 0:
            return
        if self.mode == "sleep":
            self._sleep(seconds)
        else:
            stop = self._clock() + seconds
            while self._clock() < stop:
                pass
        self.idle_s += seconds
