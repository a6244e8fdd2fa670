"""The operations engine: one background thread per process that matches operations by name across
ranks and executes them in an agreed order (Horovod's design, in Python over mpi4py).

Contract:

* :func:`start` (from ``hpc_dgrab.init``; collective) makes three private duplicates of the
  ``init`` communicator (negotiation, the global set's collectives, and the user thread's process
  set management) and starts the thread. It needs MPI ``THREAD_MULTIPLE`` (mpi4py's default).
* :meth:`Engine.submit` queues one :class:`~hpc_dgrab.ops.negotiation.Request` and returns a
  :class:`Handle` at once. The thread sends requests to rank 0, whose
  :class:`~hpc_dgrab.ops.negotiation.Table` decides what is ready; each member executes the ready
  operations (:mod:`hpc_dgrab.ops.execute`) in the order rank 0 sent them, on the set's
  communicator. ``Handle.wait()`` returns the results or raises the agreed error.
* The thread never blocks in MPI except inside an agreed collective: messages are polled
  (``iprobe``) with short sleeps that grow while idle (50 us to 2 ms), and it checks a stop flag.
* :func:`stop` (``hpc_dgrab.shutdown()``, and at interpreter exit) asks rank 0 to end; the thread
  ends once every rank asked and nothing is pending. After ``timeout`` s (a peer that never shuts
  down) the thread is told to stop at once and the duplicates are left to the OS, so exit never
  hangs. Pending handles then raise :class:`~hpc_dgrab.ops.exceptions.HorovodInternalError`.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from hpc_dgrab.errors import UserError
from hpc_dgrab.ops import execute, process_sets
from hpc_dgrab.ops.exceptions import HorovodInternalError, OpArgumentError, OpMismatchError
from hpc_dgrab.ops.negotiation import JOIN, Key, Request, Response, Table

log = logging.getLogger(__name__)

TAG_REQ, TAG_RESP = 11, 12
POLL_MIN_S, POLL_MAX_S = 5e-5, 2e-3
STOP_TIMEOUT_S = 60.0


class Handle:
    """An operation in flight: :meth:`poll` never blocks, :meth:`wait` returns its result."""

    def __init__(self, engine: Engine, seq: int, finish: Any = None) -> None:
        self._engine, self.seq, self._finish = engine, seq, finish
        self._done = threading.Event()
        self._result: Any = None
        self._error: Optional[BaseException] = None

    def _set(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        self._result, self._error = result, error
        self._done.set()

    def poll(self) -> bool:
        return self._done.is_set()

    test = poll

    def wait(self) -> Any:
        if not self._done.is_set():
            self._engine.notify_wait(self.seq)
            self._done.wait()
            self._engine.notify_wait(None)
        if self._error is not None:
            raise self._error
        result, self._result = self._result, None
        return self._finish(result) if self._finish is not None else result


@dataclass
class _Local:
    request: Request
    tensors: Optional[List[torch.Tensor]]
    comm: Any
    handle: Handle
    submitted: float


class Engine:
    """The per-process engine over one communicator (see the module docstring)."""

    def __init__(self, comm: Any) -> None:
        self.rank, self.size = comm.rank, comm.size
        self.ctl, self.data, self.mgmt = comm.Dup(), comm.Dup(), comm.Dup()
        self.timeline: Any = None
        self._seq = itertools.count(1)
        self._names: Dict[str, Any] = {}
        self._lock = threading.Lock()
        self._outbox: List[Tuple[str, Any]] = []
        self._local: Dict[int, _Local] = {}
        self._keys: Dict[Key, int] = {}
        self._wake = threading.Event()
        self._hard_stop = False
        self._fatal: Optional[BaseException] = None
        self._table = Table(self.size) if self.rank == 0 else None
        self._sends: List[Any] = []
        process_sets.reset(self.data)
        self._thread = threading.Thread(target=self._run, name="hpc_dgrab-ops", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ user thread
    def auto_name(self, kind: str) -> str:
        counter = self._names.setdefault(kind, itertools.count())
        return f"{kind}.noname.{next(counter)}"

    def submit(self, kind: str, name: Optional[str], ps: Any, tensors: Optional[List[torch.Tensor]],
               finish: Any = None, **fields: Any) -> Handle:
        if self._fatal is not None or self._hard_stop:
            raise HorovodInternalError("hpc_dgrab: the operations engine has stopped; call init() again")
        name = name if name is not None else self.auto_name(kind)
        pset = process_sets.get(ps, self.rank, f"{kind} {name!r}") if kind != JOIN else None
        key: Key = (int(pset.process_set_id or 0) if pset is not None else 0, name)
        seq = next(self._seq)
        req = Request(rank=self.rank, seq=seq, name=name, kind=kind, process_set=key[0],
                      members=tuple(pset.ranks) if pset is not None else tuple(range(self.size)),
                      dtypes=tuple(str(t.dtype).replace("torch.", "") for t in tensors or ()),
                      shapes=tuple(tuple(t.shape) for t in tensors or ()), **fields)
        handle = Handle(self, seq, finish)
        with self._lock:
            if key in self._keys:
                raise OpArgumentError(f"hpc_dgrab: {kind} {name!r} is already pending on this rank "
                                      f"(duplicate name)")
            self._keys[key] = seq
            self._local[seq] = _Local(req, tensors, pset.mpi_comm if pset is not None else None, handle,
                                      time.time())
            self._outbox.append(("req", req))
        self._wake.set()
        return handle

    def notify_wait(self, seq: Optional[int]) -> None:
        with self._lock:
            self._outbox.append(("wait", seq))
        self._wake.set()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if not self._thread.is_alive():
            return
        with self._lock:
            self._outbox.append(("shutdown", None))
        self._wake.set()
        self._thread.join(timeout)
        clean = not self._thread.is_alive()
        if not clean:
            log.warning("hpc_dgrab: the peers did not shut down within %.0f s; stopping the engine now",
                        timeout)
            self._hard_stop = True
            self._thread.join(5.0)
        self._fail_all(HorovodInternalError("hpc_dgrab: shut down while this operation was pending"))
        if self.timeline is not None:
            self.timeline.close()
            self.timeline = None
        if clean:
            if process_sets.global_process_set.mpi_comm is self.data:
                process_sets.free_all()
            for c in (self.ctl, self.data, self.mgmt):
                c.Free()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:   # noqa: BLE001 - reported to every pending handle
            log.exception("hpc_dgrab: the operations engine failed")
            self._fatal = exc
            self._fail_all(HorovodInternalError(f"hpc_dgrab: the operations engine failed: {exc}"))

    def _loop(self) -> None:
        from mpi4py import MPI

        status = MPI.Status()
        idle = 0
        while not self._hard_stop:
            busy = False
            with self._lock:
                out, self._outbox = self._outbox, []
            inbox: List[Response] = []
            if out:
                busy = True
                if self.rank == 0:
                    self._receive(0, out)
                else:
                    self._sends.append(self.ctl.isend(out, dest=0, tag=TAG_REQ))
            if self._table is not None:
                while self.ctl.iprobe(source=MPI.ANY_SOURCE, tag=TAG_REQ, status=status):
                    src = status.Get_source()
                    self._receive(src, self.ctl.recv(source=src, tag=TAG_REQ))
                    busy = True
                responses = self._table.step()
                per_rank: Dict[int, List[Response]] = {}
                for resp in responses:
                    for t in resp.targets:
                        per_rank.setdefault(t, []).append(resp)
                for t, batch in sorted(per_rank.items()):
                    if t == 0:
                        inbox.extend(batch)
                    else:
                        self._sends.append(self.ctl.isend(batch, dest=t, tag=TAG_RESP))
            else:
                while self.ctl.iprobe(source=0, tag=TAG_RESP):
                    inbox.extend(self.ctl.recv(source=0, tag=TAG_RESP))
            for resp in inbox:
                busy = True
                if resp.kind == "shutdown":
                    MPI.Request.Waitall(self._sends)
                    return
                self._execute(resp)
            if self._sends:
                self._sends = [r for r in self._sends if not r.Test()]
            if self.timeline is not None:
                self.timeline.maybe_flush()
            if busy or self._local or (self._table is not None and self._table.pending):
                idle = 0   # an operation is in flight: poll at the fastest rate
                if not busy:
                    self._wake.wait(POLL_MIN_S)
                    self._wake.clear()
            else:
                idle += 1
                self._wake.wait(min(POLL_MAX_S, POLL_MIN_S * (1.5 ** min(idle, 20))))
                self._wake.clear()

    def _receive(self, src: int, messages: List[Tuple[str, Any]]) -> None:
        assert self._table is not None
        for what, value in messages:
            if what == "req":
                self._table.submit(value)
            elif what == "wait":
                self._table.wait(src, value)
            else:
                self._table.request_shutdown(src)

    def _execute(self, resp: Response) -> None:
        mine = resp.requests.get(self.rank)
        local = None
        if mine is not None:
            with self._lock:
                local = self._local.pop(mine.seq, None)
                self._keys.pop(mine.key, None)
        if resp.kind == JOIN:
            with self._lock:
                joins = [s for s, loc in self._local.items() if loc.request.kind == JOIN]
                for s in joins:
                    loc = self._local.pop(s)
                    self._keys.pop(loc.request.key, None)
                    loc.handle._set(resp.last_joined)
                self._names.clear()   # every rank agrees here: unnamed operations count from 0 again
            return
        if resp.error is not None:
            if local is not None:
                local.handle._set(error=OpMismatchError(resp.error))
            return
        started = time.time()
        try:
            if resp.kind == "barrier":
                result: Any = []
            elif local is not None:
                result = execute.run(resp, local.comm, mine, local.tensors)
            else:   # a joined rank fills in zeros
                pset = process_sets.by_id(resp.key[0])
                result = execute.run(resp, pset.mpi_comm if pset is not None else self.data, None, None)
        except UserError as exc:
            result = None
            if local is None:
                raise
            local.handle._set(error=exc)
        if local is not None and result is not None:
            if self.timeline is not None:
                nbytes = sum(t.numel() * t.element_size() for t in local.tensors or ())
                self.timeline.record(mine.name if mine else resp.key[1], resp.kind, nbytes,
                                     local.submitted, started, time.time())
            local.handle._set(result)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            pending, self._local = self._local, {}
            self._keys.clear()
        for loc in pending.values():
            loc.handle._set(error=error)


#: every engine started since the last stop(), in start order (one per communicator), and the current one
_ENGINES: List[Tuple[weakref.ref[Any], Engine]] = []
_ENGINE: Optional[Engine] = None


def start(comm: Any) -> Engine:
    """Collective over ``comm``: make the engine of ``comm`` current, starting it if none runs on it.
    Engines of other communicators keep running (an ``init`` on a sub-communicator is taken by its
    ranks only) until :func:`stop`. Process sets belong to the current engine."""
    global _ENGINE
    from mpi4py import MPI

    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise UserError("hpc_dgrab: MPI was initialised without THREAD_MULTIPLE, which the operations "
                        "engine needs; do not set mpi4py.rc.thread_level below 'multiple'")
    found = next((e for ref, e in _ENGINES if ref() is comm), None)
    if found is None:
        found = Engine(comm)
        _ENGINES.append((weakref.ref(comm), found))
    elif found is not _ENGINE:
        process_sets.reset(found.data)
    _ENGINE = found
    return found


def stop(timeout: float = STOP_TIMEOUT_S) -> None:
    """End every engine, in start order (see the module docstring); a no-op when none runs."""
    global _ENGINE
    engines = [e for _, e in _ENGINES]
    _ENGINES.clear()
    _ENGINE = None
    for engine in engines:
        engine.stop(timeout)


def current(what: str = "this operation") -> Engine:
    """The current engine, or a one-line UserError when ``init`` was not called."""
    if _ENGINE is None:
        raise UserError(f"hpc_dgrab.init() has not been called; call it first (before {what})")
    return _ENGINE


atexit.register(stop, 30.0)
