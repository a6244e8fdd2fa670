"""Fault injection at named points, so tests reach interrupt and crash paths deterministically.

Code marks a point with :func:`point` (``faults.point("shards.file")``); nothing happens unless the
environment variable ``HPC_DGRAB_FAULT`` (read through :mod:`hpc_dgrab.runtime`) names it::

    HPC_DGRAB_FAULT="SPEC[,SPEC...]"     SPEC = POINT[#N][@RANK]:ACTION

* ``POINT``: the name passed to :func:`point`;
* ``#N``: fire the N-th time this process reaches the point (1-based; default 1);
* ``@RANK``: only on the process whose launcher rank is RANK (default: every process);
* ``ACTION``: a signal name (``SIGINT``, ``SIGTERM``, ``SIGUSR1``, ``SIGKILL``, ...) that the
  process sends to itself, or ``exit:CODE`` (immediate ``os._exit(CODE)``, no clean-up).

A signal sent to oneself is delivered before :func:`point` returns (Python runs the handler at the
next bytecode of the main thread), so the interrupted work is always the same. Points in the
package: ``shards.file`` (after each shard file is written, before the manifest and the rename).
A malformed spec raises ValueError at the first :func:`point` call.
"""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Dict, List, Optional

from hpc_dgrab import runtime

log = logging.getLogger(__name__)

ENV = "HPC_DGRAB_FAULT"


@dataclass(frozen=True)
class Fault:
    """One parsed ``POINT[#N][@RANK]:ACTION``."""

    point: str
    nth: int
    rank: Optional[int]
    action: str


def parse(text: str) -> List[Fault]:
    """Parse the value of ``HPC_DGRAB_FAULT``; ValueError (one line) when malformed."""
    faults = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        where, sep, action = spec.partition(":")  # point names hold no ':'
        if not sep or not where:
            raise ValueError(f"{ENV}: expected POINT[#N][@RANK]:ACTION, got {spec!r}")
        rank = None
        if "@" in where:
            where, _, r = where.partition("@")
            if not r.isdigit():
                raise ValueError(f"{ENV}: rank must be an integer >= 0 in {spec!r}")
            rank = int(r)
        nth = 1
        if "#" in where:
            where, _, n = where.partition("#")
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"{ENV}: #N must be an integer >= 1 in {spec!r}")
            nth = int(n)
        if action.startswith("exit:"):
            if not action[5:].isdigit():
                raise ValueError(f"{ENV}: exit code must be an integer in {spec!r}")
        elif not action.startswith("SIG") or not isinstance(getattr(signal, action, None), signal.Signals):
            raise ValueError(f"{ENV}: unknown action {action!r} in {spec!r} (a signal name or exit:CODE)")
        faults.append(Fault(where, nth, rank, action))
    return faults


_FAULTS: Optional[List[Fault]] = None
_COUNTS: Dict[str, int] = {}


def point(name: str) -> None:
    """Mark the fault point ``name``: fire the injected fault that names it, if any."""
    global _FAULTS
    if _FAULTS is None:
        _FAULTS = parse(runtime.env(ENV) or "")
    if not _FAULTS:
        return
    count = _COUNTS[name] = _COUNTS.get(name, 0) + 1
    for fault in _FAULTS:
        if fault.point != name or fault.nth != count:
            continue
        if fault.rank is not None and fault.rank != runtime.launcher_rank():
            continue
        log.debug("fault injection at %s#%d: %s", name, count, fault.action)
        if fault.action.startswith("exit:"):
            os._exit(int(fault.action[5:]))
        os.kill(os.getpid(), getattr(signal, fault.action))


def reset() -> None:
    """Forget the parsed spec and the counts (tests that change ``HPC_DGRAB_FAULT`` in-process)."""
    global _FAULTS
    _FAULTS = None
    _COUNTS.clear()
