"""The MPI transport: :class:`MPITransport`, collectives and gossip's point-to-point over mpi4py.

Contract (beyond :mod:`hpc_dgrab.comm.transport`):

* ``MPITransport(comm=None, progress="thread")`` works on a private ``Dup()`` of ``comm`` (default
  ``MPI.COMM_WORLD``; the constructor is collective), so the user's own MPI calls never interleave
  with its messages.
* ``progress`` says how ``allreduce_async_`` runs:

  - ``"thread"``: blocking in-place sums on ONE background thread (started on first use), in the
    order submitted, each in pieces of at most :data:`CHUNK_BYTES`, after every rank has reached it
    (a non-blocking barrier polled with short sleeps). Falls back to ``"inline"`` when MPI is not
    ``THREAD_MULTIPLE``. The blocking calls wait for the thread's queue to drain first.
  - ``"inline"``: the same blocking, chunked sum at once in the caller; the handle is done.
  - ``"nonblocking"``: ``MPI_Iallreduce``; MPI progresses it inside later MPI calls.

  ``allreduce_`` (blocking) is one ``MPI_Allreduce`` of the whole tensor in every mode.
  :attr:`progress` is the mode in use.
* ``close()`` ends the thread (after the sums queued, waiting at most :data:`CLOSE_WAIT_S`) and
  frees the duplicate; a ``weakref.finalize`` does it when the transport is collected, and
  :func:`hpc_dgrab.comm.transport.close_all` for every live transport.
* Point-to-point requests are mpi4py's own request objects (opaque to callers); ``start``,
  ``testsome``, ``waitall``, ``cancel`` and ``free`` are mpi4py's functions themselves (no wrapper
  on gossip's hot path).
"""
from __future__ import annotations

import functools
import logging
import queue
import threading
import time
import weakref
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from hpc_dgrab import runtime
from hpc_dgrab.comm import transport as _transport
from hpc_dgrab.comm.staging import BufferSpecs, PinnedBuffers, Staged, cpu_array, mpi
from hpc_dgrab.comm.transport import Done, Handle, Request

log = logging.getLogger(__name__)

PROGRESS = ("thread", "inline", "nonblocking")
#: a blocking all-reduce of a longer tensor goes in pieces of at most this many bytes (MPI's
#: all-reduce of a long message allocates a temporary of half the message or more)
CHUNK_BYTES = 1 << 20
#: sleep between polls of the barrier before each threaded sum
POLL_S = 1e-4
#: how long close() waits for the thread's queued sums (a rank whose peers never join them, e.g.
#: at exit after an error, must not hang): the thread and the duplicate are then left to the OS
CLOSE_WAIT_S = 30.0


def pieces(msg: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> List[torch.Tensor]:
    """``msg`` (1-D, contiguous) as consecutive views of at most ``chunk_bytes`` each."""
    n = max(1, chunk_bytes // msg.element_size())
    return [msg] if msg.numel() <= n else list(msg.split(n))


def _check_average(tensor: torch.Tensor) -> None:
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(f"average=True needs a floating-point tensor, got {tensor.dtype}")


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(1) if tensor.dim() == 0 else tensor


def _sum_blocking(comm: Any, specs: BufferSpecs, pinned: PinnedBuffers, tensor: torch.Tensor,
                  chunked: bool = True) -> None:
    """Sum ``tensor`` over ``comm`` in place, blocking; ``chunked``: in pieces of at most
    :data:`CHUNK_BYTES`, otherwise in one call."""
    MPI = mpi()
    if tensor.is_cpu and tensor.is_contiguous():
        if tensor.nbytes <= CHUNK_BYTES or not chunked:   # one piece: no view, no split
            spec = specs.get(tensor)
            comm.Allreduce(MPI.IN_PLACE, spec if spec is not None else cpu_array(tensor), op=MPI.SUM)
            return
        for piece in pieces(tensor.view(-1)):
            spec = specs.get(piece)
            comm.Allreduce(MPI.IN_PLACE, spec if spec is not None else cpu_array(piece), op=MPI.SUM)
        return
    staged = Staged(tensor, pinned)
    flat = staged.buf.reshape(-1)
    n = max(1, CHUNK_BYTES // tensor.element_size()) if chunked else max(1, flat.shape[0])
    for start in range(0, flat.shape[0], n):
        comm.Allreduce(MPI.IN_PLACE, flat[start:start + n], op=MPI.SUM)
    staged.finish()


# ---------------------------------------------------------------------------------------- handles
class _Nonblocking:
    """A handle of an ``Iallreduce`` on the tensor's memory or on a staging buffer."""

    __slots__ = ("_request", "_tensor", "_staged", "_average", "_size", "_done")

    def __init__(self, request: Any, tensor: torch.Tensor, staged: Optional[Staged], average: bool,
                 size: int) -> None:
        self._request = request
        self._tensor = tensor
        self._staged = staged
        self._average = average
        self._size = size
        self._done = False

    def test(self) -> bool:
        return self._done or bool(self._request.Test())

    def wait(self) -> torch.Tensor:
        if not self._done:
            self._request.Wait()
            if self._staged is not None:
                self._staged.finish()
                self._staged = None
            if self._average:
                self._tensor.div_(self._size)
            self._done = True
        return self._tensor


class _Ticket:
    """A sum queued on the progress thread; ``wait()`` returns once the thread has done it."""

    __slots__ = ("tensor", "average", "done", "error")

    def __init__(self, tensor: torch.Tensor, average: bool) -> None:
        self.tensor = tensor
        self.average = average
        self.done = threading.Event()
        self.error: Optional[BaseException] = None

    def test(self) -> bool:
        return self.done.is_set()

    def wait(self) -> torch.Tensor:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.tensor


# ---------------------------------------------------------------------------------------- thread
class _Resources:
    """What a transport must give back: its duplicated communicator and its progress thread.
    Holds no reference to the transport, so the transport's finalizer can own it."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.specs = BufferSpecs()      # used by the caller's thread, or by the progress thread
        self.pinned = PinnedBuffers()   # (never both at once: blocking calls drain the queue first)
        self.queue: queue.SimpleQueue[Optional[_Ticket]] = queue.SimpleQueue()
        self.thread: Optional[threading.Thread] = None
        self.last: Optional[_Ticket] = None     # the latest ticket submitted
        self.closed = False

    def submit(self, tensor: torch.Tensor, average: bool) -> _Ticket:
        if self.thread is None:
            self.thread = threading.Thread(target=_run, args=(self.queue, self.comm, self.specs, self.pinned),
                                           name="hpc_dgrab-allreduce", daemon=True)
            self.thread.start()
        ticket = self.last = _Ticket(tensor, average)
        self.queue.put(ticket)
        return ticket

    def drain(self) -> None:
        """Wait until the thread has done every sum submitted (so the caller may use ``comm``)."""
        last, self.last = self.last, None
        if last is not None:
            last.wait()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        thread, self.thread = self.thread, None
        if thread is not None:
            self.queue.put(None)
            if thread is not threading.current_thread():
                thread.join(CLOSE_WAIT_S)
            if thread.is_alive():
                log.warning("MPI transport: the all-reduce thread did not finish within %.0f s "
                            "(peers missing?); leaving it and its communicator", CLOSE_WAIT_S)
                return
        MPI = mpi()
        if not MPI.Is_finalized():
            self.comm.Free()
        log.debug("MPI transport closed")


def _run(tickets: queue.SimpleQueue[Optional[_Ticket]], comm: Any, specs: BufferSpecs,
         pinned: PinnedBuffers) -> None:
    """The progress thread: each ticket's sum, in order, after every rank has arrived (sleeping
    between polls, so that a rank waiting for a slower one does not take its CPU)."""
    size = comm.size
    while True:
        ticket = tickets.get()
        if ticket is None:
            return
        try:
            arrived = comm.Ibarrier()
            while not arrived.Test():
                time.sleep(POLL_S)
            _sum_blocking(comm, specs, pinned, ticket.tensor)
            if ticket.average:
                ticket.tensor.div_(size)
        except BaseException as exc:  # handed to the waiting thread
            ticket.error = exc
        finally:
            ticket.done.set()


# ---------------------------------------------------------------------------------------- transport
class MPITransport:
    """Collectives and point-to-point over a private duplicate of an MPI communicator."""

    def __init__(self, comm: Optional[Any] = None, progress: str = "thread") -> None:
        if progress not in PROGRESS:
            raise ValueError(f"progress must be one of {', '.join(PROGRESS)}, got {progress!r}")
        MPI = mpi()
        base = comm if comm is not None else runtime.world()
        if progress == "thread" and MPI.Query_thread() != MPI.THREAD_MULTIPLE:
            log.debug("MPI is not THREAD_MULTIPLE: progress 'inline' instead of 'thread'")
            progress = "inline"
        self.progress = progress
        self.comm = base.Dup()
        self.rank: int = self.comm.rank
        self.size: int = self.comm.size
        self.calls = 0
        self._bytes = 0
        self._res = _Resources(self.comm)
        self._finalizer = weakref.finalize(self, self._res.close)
        # (weakref to the last tensor, its address, its bytes, the bound MPI call on its buffer)
        self._hot: Optional[Tuple[Any, int, int, Any]] = None
        self._IN_PLACE, self._SUM, self._BYTE = MPI.IN_PLACE, MPI.SUM, MPI.BYTE
        # gossip's hot path calls mpi4py itself: no wrapper in between
        self.start = MPI.Prequest.Start
        self.testsome = MPI.Request.Testsome
        self.waitall = MPI.Request.Waitall
        self.cancel = MPI.Request.Cancel
        self.free = MPI.Request.Free
        _transport.register(self)

    # ------------------------------------------------------------------------------ life
    @property
    def closed(self) -> bool:
        return self._res.closed

    def close(self) -> None:
        """Stop the progress thread (after the sums queued) and free the communicator; idempotent."""
        self._hot = None
        self._finalizer()

    def _check(self) -> None:
        if self._res.closed:
            raise RuntimeError("the MPI transport is closed")

    @property
    def bytes_sent(self) -> int:
        return self._bytes

    def __repr__(self) -> str:
        return f"MPITransport(rank={self.rank}, size={self.size}, progress={self.progress!r})"

    # ------------------------------------------------------------------------------ all-reduce
    def _count(self, tensor: torch.Tensor, average: bool) -> None:
        """Refuse a closed transport or an integer mean; count the call and its bytes."""
        self._check()
        if average:
            _check_average(tensor)
        self.calls += 1
        self._bytes += tensor.nbytes

    def allreduce_async_(self, tensor: torch.Tensor, average: bool = False) -> Handle:
        self._count(tensor, average)
        if self.size == 1:
            return Done(tensor)
        if self.progress == "thread":
            return self._res.submit(tensor, average)
        if self.progress == "inline":
            _sum_blocking(self.comm, self._res.specs, self._res.pinned, tensor)
            if average:
                tensor.div_(self.size)
            return Done(tensor)
        MPI = mpi()
        if tensor.is_cpu and tensor.is_contiguous():
            spec = self._res.specs.get(tensor)
            if spec is not None:
                return _Nonblocking(self.comm.Iallreduce(MPI.IN_PLACE, spec, op=MPI.SUM), tensor, None,
                                    average, self.size)
        staged = Staged(tensor, self._res.pinned, slot=None)
        request = self.comm.Iallreduce(MPI.IN_PLACE, staged.buf, op=MPI.SUM)
        return _Nonblocking(request, tensor, staged, average, self.size)

    def allreduce_(self, tensor: torch.Tensor, average: bool = False) -> torch.Tensor:
        hot = self._hot
        if hot is not None and hot[0]() is tensor and tensor.data_ptr() == hot[1] \
                and tensor.nbytes == hot[2] and self._res.last is None:
            # the same tensor object as last time, same memory and size: no re-validation, no new
            # spec, no argument packing (the call is bound once)
            hot[3]()
            self.calls += 1
            self._bytes += hot[2]
            if average:
                tensor.div_(self.size)
            return tensor
        self._count(tensor, average)
        if self.size == 1:
            return tensor
        self._res.drain()
        res = self._res
        if tensor.is_cpu and tensor.is_contiguous():
            spec = res.specs.get(tensor)
            if spec is not None:
                self._hot = (weakref.ref(tensor), tensor.data_ptr(), tensor.nbytes,
                             functools.partial(self.comm.Allreduce, self._IN_PLACE, spec, self._SUM))
        _sum_blocking(self.comm, res.specs, res.pinned, tensor, chunked=False)
        if average:
            tensor.div_(self.size)
        return tensor

    # ------------------------------------------------------------------------------ gather, broadcast
    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        self._check()
        self._res.drain()
        src = _rows(tensor)
        self.calls += 1
        self._bytes += src.nbytes
        pinned = self._res.pinned
        out = torch.empty((self.size * src.shape[0],) + tuple(src.shape[1:]), dtype=src.dtype,
                          device=src.device)
        staged_out = Staged(out, pinned, slot="recv")
        self.comm.Allgather(Staged(src, pinned, readonly=True, slot="send").buf, staged_out.buf)
        return staged_out.finish()

    def allgatherv(self, tensor: torch.Tensor,
                   counts: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, List[int]]:
        self._check()
        self._res.drain()
        src = _rows(tensor)
        self.calls += 1
        self._bytes += src.nbytes
        if counts is None:
            rows = np.empty(self.size, dtype=np.int64)
            self.comm.Allgather(np.array([src.shape[0]], dtype=np.int64), rows)
            firsts = rows.tolist()
        else:
            firsts = [int(c) for c in counts]
        per_row = int(np.prod(src.shape[1:], dtype=np.int64))
        sizes = [c * per_row for c in firsts]
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64).tolist()
        pinned = self._res.pinned
        out = torch.empty((sum(firsts),) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
        staged_out = Staged(out, pinned, slot="recv")
        send = Staged(src, pinned, readonly=True, slot="send").buf
        self.comm.Allgatherv(send, [staged_out.buf, (sizes, displs)])
        return staged_out.finish(), firsts

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        self._check()
        self._res.drain()
        self.calls += 1
        self._bytes += tensor.nbytes
        if self.size > 1:
            staged = Staged(tensor, self._res.pinned)
            self.comm.Bcast(staged.buf, root=root)
            staged.finish()
        return tensor

    # ------------------------------------------------------------------------------ point-to-point
    def send_init(self, buf: np.ndarray, dest: int, tag: int) -> Request:
        self._check()
        return self.comm.Ssend_init([buf, self._BYTE], dest=dest, tag=tag)

    def recv_init(self, buf: np.ndarray, source: int, tag: int) -> Request:
        self._check()
        return self.comm.Recv_init([buf, self._BYTE], source=source, tag=tag)

    def issend(self, buf: np.ndarray, dest: int, tag: int) -> Request:
        self._check()
        return self.comm.Issend([buf, self._BYTE], dest=dest, tag=tag)
