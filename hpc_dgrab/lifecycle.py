"""The job ends as a whole: one rank's uncaught exception or early exit never leaves the others waiting.

:func:`install` (called by :func:`hpc_dgrab.init`, collective over its communicator) sets up two things:

* **An exception hook.** An uncaught exception on any rank prints its traceback once (on that
  rank), then ``error: rank R: uncaught <Type>: <message>``, and aborts the whole job (``MPI_Abort``,
  exit 1) so that no rank waits forever in a collective. An uncaught
  :class:`~hpc_dgrab.errors.UserError` is one line ``error: ...`` and exit 2 instead: a collective
  one (raised on every rank together) exits 2 on every rank normally, a one-rank one aborts with 2.
  A hook the user set before ``init`` is left in place.
* **A departure watchdog** (jobs of more than one rank). When a rank's interpreter ends (a
  ``sys.exit(0)`` mid-loop, fewer steps than the others, the end of the script) an ``atexit`` hook
  tells every other rank over a private duplicate of the communicator. A daemon thread on each rank
  listens; a rank that has heard of a departure and has sat in the same place inside an
  ``hpc_dgrab`` call for longer than the grace (a collective that can no longer complete) prints
  ``error: rank R: rank Q left the job ...`` and aborts the job (exit 1). Ranks that end together
  at the end of a script never trip it: none of them waits in a collective. The grace is
  ``HPC_DGRAB_DEPARTED_GRACE_S`` seconds (default 5); ``HPC_DGRAB_WATCHDOG=0`` turns the watchdog off.

Uneven numbers of steps are not joined for :class:`~hpc_dgrab.DistributedOptimizer`: every rank
must call ``step()`` equally often (:class:`~hpc_dgrab.OrderedSampler` gives every rank the same
number of batches); a rank that ends early ends the job with the error above.

The watchdog thread is a daemon and the ``atexit`` hook stops and joins it before ``MPI_Finalize``
(which mpi4py runs after every ``atexit`` hook), so it never holds up the interpreter's exit.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import traceback
from types import TracebackType
from typing import Any, Dict, Optional, Tuple, Type

from hpc_dgrab.errors import EXIT_INTERNAL, EXIT_USAGE, UserError

log = logging.getLogger(__name__)

#: tag of the departure message on the private communicator
TAG_DEPARTED = 7301
DEFAULT_GRACE_S = 5.0
POLL_S = 0.2
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def grace_s() -> float:
    """``HPC_DGRAB_DEPARTED_GRACE_S`` (seconds a rank may wait in a collective after a peer left)."""
    text = os.environ.get("HPC_DGRAB_DEPARTED_GRACE_S", "")
    try:
        value = float(text) if text else DEFAULT_GRACE_S
    except ValueError:
        raise UserError(f"HPC_DGRAB_DEPARTED_GRACE_S must be a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise UserError(f"HPC_DGRAB_DEPARTED_GRACE_S must be >= 0, got {text!r}")
    return value


def _say(line: str) -> None:
    try:
        sys.stdout.flush()
    except Exception:  # a closed stdout must not hide the error line
        pass
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()


def _abort(comm: Any, code: int) -> None:
    """End the whole job now with ``code`` (``MPI_Abort`` on more than one rank)."""
    try:
        sys.stderr.flush()
    finally:
        if comm is not None and comm.size > 1:
            comm.Abort(code)
        os._exit(code)


def _exit_cleanly(code: int) -> None:
    """Exit with ``code`` from inside the exception hook: run the ``atexit`` hooks, finalise MPI."""
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Watch:
    """This rank's half of the departure protocol: the listener thread and the ``atexit`` notice."""

    def __init__(self, comm: Any, grace: float) -> None:
        self.comm = comm.Dup()   # private: our messages never meet the user's
        self.rank, self.size, self.grace = comm.rank, comm.size, grace
        self.departed: Dict[int, float] = {}
        self.stopping = threading.Event()
        self.main_ident = threading.main_thread().ident
        self.thread: Optional[threading.Thread] = None
        self._sig: Tuple[Tuple[int, int], ...] = ()
        self._sig_since = 0.0

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="hpc_dgrab-watchdog", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- the listener
    def _waiting_signature(self) -> Tuple[Tuple[int, int], ...]:
        """Where the main thread is inside hpc_dgrab: (frame id, instruction) of each such frame."""
        frame = sys._current_frames().get(self.main_ident or -1)
        out = []
        while frame is not None:
            if frame.f_code.co_filename.startswith(_PACKAGE):
                out.append((id(frame), frame.f_lasti))
            frame = frame.f_back
        return tuple(out)

    def _poll(self) -> None:
        import numpy as np
        from mpi4py import MPI

        status = MPI.Status()
        buf = np.zeros(1, dtype=np.int64)
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_DEPARTED, status=status):
            self.comm.Recv(buf, source=status.Get_source(), tag=TAG_DEPARTED)
            self.departed.setdefault(status.Get_source(), time.monotonic())

    def _run(self) -> None:
        try:
            self._listen()
        except Exception as exc:  # the watchdog must never take the rank down by itself
            log.debug("watchdog stopped: %s", exc)

    def _listen(self) -> None:
        mpi = sys.modules["mpi4py.MPI"]
        while not self.stopping.wait(POLL_S):
            if mpi.Is_finalized():
                return
            self._poll()
            if not self.departed:
                continue
            now = time.monotonic()
            sig = self._waiting_signature()
            if sig != self._sig:
                self._sig, self._sig_since = sig, now
            first = min(self.departed, key=lambda r: self.departed[r])
            if sig and now - max(self._sig_since, self.departed[first]) > self.grace:
                if self.stopping.is_set():
                    return
                _say(f"error: rank {self.rank}: rank {first} has exited while this "
                     f"rank waits in an hpc_dgrab collective ({self.grace:g} s); every rank must make "
                     "the same collective calls, e.g. the same number of optimizer steps; ending the job")
                _abort(self.comm, EXIT_INTERNAL)

    # ---------------------------------------------------------------- the notice
    def depart(self) -> None:
        """``atexit``: stop the listener, then tell every other rank that this one has left."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=2 * POLL_S + 1)
        mpi = sys.modules["mpi4py.MPI"]
        if mpi.Is_finalized():
            return
        import numpy as np

        buf = np.array([self.rank], dtype=np.int64)
        try:
            reqs = [self.comm.Isend(buf, dest=r, tag=TAG_DEPARTED)
                    for r in range(self.size) if r != self.rank]
            deadline = time.monotonic() + 1.0
            while not mpi.Request.Testall(reqs) and time.monotonic() < deadline:
                time.sleep(0.01)
        except Exception as exc:  # leaving anyway: a failed notice must not change the exit
            log.debug("departure notice not sent: %s", exc)


_WATCH: Optional[_Watch] = None
_INSTALLED_ON: Any = None
_PREVIOUS_HOOK: Any = None


def _hook(tp: Type[BaseException], value: BaseException, tb: Optional[TracebackType]) -> None:
    comm = _INSTALLED_ON
    size = comm.size if comm is not None else 1
    rank = comm.rank if comm is not None else 0
    if isinstance(value, UserError):
        if getattr(value, "collective", False) or size == 1:
            if rank == 0:
                _say(f"error: {value}")
            _exit_cleanly(EXIT_USAGE)
        _say(f"error: rank {rank}: {value}")
        _abort(comm, EXIT_USAGE)
    if isinstance(value, KeyboardInterrupt):
        _say(f"error: rank {rank}: interrupted")
        _abort(comm, 130)
    traceback.print_exception(tp, value, tb)
    _say(f"error: rank {rank}: uncaught {describe(value)}" + ("; ending the job" if size > 1 else ""))
    _abort(comm, EXIT_INTERNAL)


def _stop_watch() -> None:
    """Stop and join the current watchdog, without a departure notice (none: nothing)."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.stopping.set()
        if _WATCH.thread is not None:
            _WATCH.thread.join()
        atexit.unregister(_WATCH.depart)
        _WATCH = None


def install(comm: Any) -> None:
    """Collective over ``comm``: the exception hook and, with more than one rank, the departure
    watchdog on ``comm``; each call replaces the previous watchdog. Every call does the same
    collective work (one ``Dup``), whatever this rank's earlier calls were: a rank-local "already
    installed" shortcut would hang the others after an ``init`` on a sub-communicator that only
    some ranks took part in. See the module docstring."""
    global _WATCH, _INSTALLED_ON, _PREVIOUS_HOOK
    _stop_watch()
    _INSTALLED_ON = comm
    if sys.excepthook is sys.__excepthook__:  # never replace a hook the user set
        _PREVIOUS_HOOK = sys.excepthook
        sys.excepthook = _hook
    if comm.size > 1 and os.environ.get("HPC_DGRAB_WATCHDOG", "1") != "0":
        _WATCH = _Watch(comm, grace_s())
        atexit.register(_WATCH.depart)
        _WATCH.start()


def uninstall() -> None:
    """Stop the watchdog (without a departure notice) and restore the exception hook (tests)."""
    global _WATCH, _INSTALLED_ON, _PREVIOUS_HOOK
    _stop_watch()
    if sys.excepthook is _hook and _PREVIOUS_HOOK is not None:
        sys.excepthook = _PREVIOUS_HOOK
    _INSTALLED_ON = _PREVIOUS_HOOK = None
