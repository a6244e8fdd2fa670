"""``start_timeline``/``stop_timeline``: a Chrome/Perfetto trace of every operation this rank runs.

Each operation becomes one complete event (``"ph": "X"``) from its submission to its end, with its
name, kind, bytes, and the time it waited for the other ranks (``args.wait_us``: submission to the
start of the data transfer) and moved data (``args.run_us``). Rank 0 writes ``path``; rank r > 0
writes ``<path without .json>.rank<r>.json``. The file is rewritten atomically (a temporary file,
then a rename) about once per second by the engine thread and at ``stop_timeline``/shutdown, so it
is valid JSON even after Ctrl-C or a kill. At most :data:`MAX_EVENTS` events are kept; later ones
are counted and the trace notes the truncation. ``mark_cycles`` is accepted for Horovod's
signature; the engine has no fusion cycles to mark.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Dict, List, Optional

from hpc_dgrab.ops import engine

MAX_EVENTS = 100_000
FLUSH_S = 1.0


def rank_path(path: str, rank: int) -> str:
    """The file rank ``rank`` writes for ``path``."""
    if rank == 0:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext or '.json'}"


class Timeline:
    """Events of one rank, flushed atomically to one file."""

    def __init__(self, path: str, rank: int, mark_cycles: bool = False, max_events: int = MAX_EVENTS) -> None:
        self.path, self.rank, self.mark_cycles, self.max_events = path, rank, mark_cycles, max_events
        self.events: List[Dict[str, Any]] = []
        self.dropped = 0
        self._lock = threading.Lock()
        self._dirty = True
        self._last = 0.0
        self.flush()

    def record(self, name: str, kind: str, nbytes: int, submitted: float, started: float,
               ended: float) -> None:
        with self._lock:
            if len(self.events) >= self.max_events:
                self.dropped += 1
            else:
                self.events.append({"name": name, "cat": kind, "ph": "X", "pid": self.rank, "tid": 0,
                                    "ts": round(submitted * 1e6), "dur": round((ended - submitted) * 1e6),
                                    "args": {"bytes": nbytes, "wait_us": round((started - submitted) * 1e6),
                                             "run_us": round((ended - started) * 1e6)}})
            self._dirty = True

    def maybe_flush(self) -> None:
        if self._dirty and time.monotonic() - self._last >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            events = list(self.events)
            meta = {"rank": self.rank, "events": len(events), "dropped_events": self.dropped,
                    "truncated": self.dropped > 0}
            self._dirty = False
        self._last = time.monotonic()
        doc = {"traceEvents": [{"name": "process_name", "ph": "M", "pid": self.rank,
                                "args": {"name": f"rank {self.rank}"}}] + events,
               "displayTimeUnit": "ms", "otherData": meta}
        tmp = f"{self.path}.tmp{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.path)

    def close(self) -> None:
        self.flush()


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Start writing this rank's trace (see the module docstring); replaces a running one."""
    eng = engine.current("start_timeline()")
    if eng.timeline is not None:
        eng.timeline.close()
    eng.timeline = Timeline(rank_path(file_path, eng.rank), eng.rank, mark_cycles)


def stop_timeline() -> None:
    """Write the trace a last time and stop recording."""
    eng = engine.current("stop_timeline()")
    tl: Optional[Timeline] = eng.timeline
    eng.timeline = None
    if tl is not None:
        tl.close()
