"""``DistributedOptimizer``: synchronous data-parallel SGD inside the user's own training loop.

The user keeps their loop::

    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters())
    opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

What happens (the design of Horovod's and DDP's wrappers):

* ``DistributedOptimizer(optimizer, ...)`` returns an object of a *subclass of the user's optimizer
  class* that shares the optimizer's param groups and state, so ``isinstance`` checks, LR
  schedulers and ``state_dict`` keep working.
* Trainable parameters (``requires_grad``; frozen ones are left alone) are laid out, in reverse
  order (the order backward produces their gradients), into fixed *buckets* of at most
  ``bucket_cap_mb`` MiB of one dtype and device. Each parameter's ``.grad`` is a view into its
  bucket's flat buffer. ``zero_grad()`` (``set_to_none=True``, torch's default) drops the
  gradients, so backward hands each one over fresh and the hook writes it into its slot already
  divided by the number of ranks: one pass, where zero-filling the bucket, accumulating into it
  and dividing after the sum would be three. The sum over ranks is then the mean. With
  ``set_to_none=False`` the buckets are zero-filled and backward accumulates into the views.
  A parameter of at least ``ALONE_MB`` (1 MiB) has a bucket of its own, which holds no buffer
  between ``zero_grad()`` and backward: autograd's fresh gradient BECOMES its buffer (no copy), so
  that gradient is never in memory twice.
* A hook on each parameter (``register_post_accumulate_grad_hook``) counts its gradient; when
  every parameter of a bucket has its ``backward_passes_per_step`` gradients, the bucket's
  non-blocking all-reduce starts while backward goes on. Buckets start strictly in index order on
  every rank (a bucket that is full before its predecessors waits for them), so every rank starts
  the same collectives in the same order: this is what makes it deadlock-free.
* ``synchronize()`` (called by ``step()``) zero-fills the slots of parameters that got no gradient
  on this rank in this step (DDP's ``find_unused_parameters``: they count as zero), starts the
  remaining buckets in order and waits for all of them. The last
  bucket always starts here, because it also carries the step's *payloads* and one "used" flag per
  parameter: a parameter that got no gradient on ANY rank gets ``.grad = None`` (the optimizer then
  skips it, as in one process), every other one the mean over ranks.
* All collectives run on a private duplicate of the ``init`` communicator, so the user's own MPI
  calls between backward and ``step()`` cannot interleave with ours. A bucket longer than
  ``CHUNK_MB`` is summed in pieces of that size (MPI's all-reduce of a long message allocates a
  temporary of half the message or more).

Payload channel (for small per-step agreements that must not cost a collective of their own: a
stop flag, D-GraB's order data)::

    flag = opt.add_payload(torch.tensor([1.0 if stop else 0.0]))   # before step()/synchronize()
    opt.step()
    if flag.value.item() > 0: ...                                  # summed over ranks

A payload is summed over ranks in the SAME message as the gradient (copied straight into the
last bucket's all-reduce buffer, or appended to the sparse message under compression), in the
gradient's dtype. Every rank must add payloads of the same sizes in the same order in a step.
``on_result`` (optional) is called with the sum after synchronisation. On the dense path
``value`` is a view into the message (no copy of a long payload), valid until the next step's
``synchronize()``: clone it to keep it longer.

Compression: ``compression=TopK(density=0.01)`` or ``RegTopK(density=0.01, mu=4.0)`` replaces the
dense all-reduce by one sparse all-gather of the error-compensated top-k with error feedback
(:mod:`hpc_dgrab.compress`) over the whole flat gradient, exchanged in ``step()``: each parameter's
``.grad`` stays autograd's own tensor, added into the error memory and then overwritten with its
part of the mean (the flat gradient is never copied together); the payloads ride as its extra
field. The error memory and last selection are in ``state_dict()``.
Every rank receives the same selections and sums them in the same order, so the ranks' parameters
stay bit-identical.

``bytes_sent`` counts the bytes this rank handed to the network (message sizes). ``backend="horovod"``
runs the dense all-reduces through Horovod (``hvd.allreduce_async_``) instead of MPI.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from hpc_dgrab import api
from hpc_dgrab.compress import Compressor, GradientExchange, RegTopK, TopK
from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["DistributedOptimizer", "Payload", "RegTopK", "TopK"]

STATE_KEY = "hpc_dgrab"
#: size at which the first bucket (the last layers' gradients, produced first) is started
FIRST_BUCKET_MB = 1.0
#: the gradients left for the final message (sent with the payloads after backward)
FINAL_BUCKET_MB = 1.0
#: a parameter of at least this size (or the cap, if smaller) gets a bucket of its own, which
#: adopts autograd's gradient instead of copying it (the gradient is then in memory once)
ALONE_MB = 1.0
#: how the MPI backend runs a bucket's all-reduce: "thread" (blocking MPI_Allreduce on a
#: communication thread, overlapped with backward), "inline" (blocking, in the hook that fills the
#: bucket: no overlap, no thread hand-off) or "nonblocking" (MPI_Iallreduce, progressed by the hooks)
COMM_MODE = "thread"
#: the MPI all-reduce of a larger bucket goes in pieces of at most this size (see ``_pieces``)
CHUNK_MB = 1.0
#: a payload region of the last bucket larger than this is given back after each step (a long
#: payload, such as D-GraB's order data, then takes no memory outside synchronize())
KEEP_PAYLOAD_MB = 1.0


# ------------------------------------------------------------------------------------- payloads
class Payload:
    """A tensor summed over ranks with the step's gradient; ``value`` holds the sum afterwards."""

    def __init__(self, tensor: torch.Tensor,
                 on_result: Optional[Callable[[torch.Tensor], Any]] = None) -> None:
        self.tensor = tensor.detach().reshape(-1)
        self.on_result = on_result
        #: the sum over ranks after synchronize(); on the dense path, for a payload in the
        #: gradients' dtype, a view into the step's message (valid until the next synchronize())
        self.value: Optional[torch.Tensor] = None

    @property
    def numel(self) -> int:
        return self.tensor.numel()


# ------------------------------------------------------------------------------------- buckets
class _Bucket:
    """A flat buffer holding the gradients of some parameters (views), plus its in-flight handle.

    ``buf`` is the gradient region; ``store`` is ``buf`` followed by ``reserve`` spare entries where
    the last bucket carries the step's extras, so that its message is a prefix of ``store`` (no copy).

    A bucket of ONE parameter that carries no extras is *adoptable*: ``release()`` (from
    ``zero_grad(set_to_none=True)``) lets go of its buffer, and the next backward's fresh gradient
    becomes the buffer itself (``adopt``) instead of being copied into a preallocated slot. The
    largest parameter's gradient is then never in memory twice (autograd's tensor and its copy),
    and the hook saves one pass over it.
    """

    def __init__(self, index: int, params: List[torch.Tensor], dtype: torch.dtype, device: torch.device,
                 reserve: int = 0) -> None:
        self.index = index
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.dtype, self.device, self.reserve, self.base_reserve = dtype, device, reserve, reserve
        self.adoptable = len(params) == 1 and reserve == 0
        self.offsets: List[int] = []
        off = 0
        for p in params:
            self.offsets.append(off)
            off += p.numel()
        self._store: Optional[torch.Tensor] = None
        self.buf = torch.empty(0)
        self._set_store(torch.zeros(self.numel + reserve, dtype=dtype, device=device))
        self.pending = len(params)    # parameters still missing their gradients this step
        self.handle: Any = None
        self.message: Optional[torch.Tensor] = None  # buf, or [buf | payloads | used] for the last bucket

    def _set_store(self, store: torch.Tensor) -> None:
        self._store = store
        self.buf = store[:self.numel]

    @property
    def store(self) -> torch.Tensor:
        """The buffer (allocated, zero-filled, if released)."""
        if self._store is None:
            self._set_store(torch.zeros(self.numel + self.reserve, dtype=self.dtype, device=self.device))
        return self._store

    @property
    def held(self) -> bool:
        return self._store is not None

    def release(self) -> None:
        """Let go of an adoptable bucket's buffer (its parameter's ``.grad`` was set to None)."""
        if self.adoptable:
            self._store = None
            self.buf = torch.empty(0)

    def adopt(self, grad: Optional[torch.Tensor]) -> bool:
        """Make ``grad`` (a fresh gradient of this bucket's one parameter) the released buffer, when it
        is a whole contiguous tensor of the right type: True if adopted."""
        p = self.params[0]
        if not self.adoptable or self._store is not None or grad is None or grad.shape != p.shape \
                or grad.dtype != self.dtype or grad.device != self.device or not grad.is_contiguous() \
                or grad.storage_offset() != 0 or grad.untyped_storage().nbytes() != grad.nbytes:
            return False
        self._set_store(grad.detach().view(-1))
        return True

    def slot(self, k: int) -> torch.Tensor:
        p = self.params[k]
        store = self.store
        return store[self.offsets[k]:self.offsets[k] + p.numel()].view_as(p)

    def message_with(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """``[gradients | parts...]`` as a prefix of ``store`` (grown once, gradient views re-pointed);
        each part is copied into its region in the gradients' dtype (no intermediate copy)."""
        need = self.numel + sum(t.numel() for t in parts)
        if need > self.store.numel():
            # every element of the message is written below (gradients, then each part): no zero-fill
            store = torch.empty(need + 64, dtype=self.dtype, device=self.device)
            store[:self.numel].copy_(self.buf)
            self._set_store(store)
            self.reserve = need + 64 - self.numel
            for k, p in enumerate(self.params):
                p.grad = self.slot(k)
        msg = self.store[:need]
        off = self.numel
        for t in parts:
            msg[off:off + t.numel()].copy_(t.reshape(-1))
            off += t.numel()
        return msg

    def shrink(self) -> None:
        """Give back a payload region grown past ``KEEP_PAYLOAD_MB`` (the gradients are copied into a
        buffer of their own size plus the initial reserve, and their views re-pointed)."""
        old = self._store
        if old is None or (old.numel() - self.numel - self.base_reserve) * old.element_size() \
                <= KEEP_PAYLOAD_MB * 2 ** 20:
            return
        self._set_store(torch.zeros(self.numel + self.base_reserve, dtype=self.dtype, device=self.device))
        self.buf.copy_(old[:self.numel])
        self.reserve = self.base_reserve
        for k, p in enumerate(self.params):
            if p.grad is not None and p.grad.untyped_storage().data_ptr() == old.untyped_storage().data_ptr():
                p.grad = self.slot(k)


def _pieces(msg: torch.Tensor) -> List[torch.Tensor]:
    """``msg`` as consecutive views of at most ``CHUNK_MB`` (MPI's all-reduce of a long message
    allocates a temporary of half the message or more; one piece at a time bounds it)."""
    n = max(1, int(CHUNK_MB * 2 ** 20) // msg.element_size())
    return [msg] if msg.numel() <= n else list(msg.split(n))


class _Ticket:
    """One all-reduce queued on a :class:`_CommThread`; ``wait()`` returns when it is done."""

    def __init__(self, msg: torch.Tensor) -> None:
        self.msg = msg
        self.pieces = _pieces(msg)
        self.done = threading.Event()
        self.error: Optional[BaseException] = None

    def test(self) -> bool:
        return self.done.is_set()

    def wait(self) -> torch.Tensor:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.msg


class _CommThread:
    """Runs blocking in-place sums on one communicator, one at a time, in the order submitted.

    MPI's blocking all-reduce is the fastest algorithm of the library and, on its own thread, it
    overlaps with backward (mpi4py releases the GIL inside MPI, torch inside its kernels). Before
    each sum the thread waits, sleeping between polls of a non-blocking barrier, until every rank
    has reached it: MPI busy-polls inside a blocking collective, and a rank that spins while waiting
    for a slower one takes CPU from it wherever ranks share cores. Only this thread uses ``comm``.
    Needs ``MPI_THREAD_MULTIPLE``.
    """

    POLL_S = 1e-4

    def __init__(self, allreduce_sum_: Callable[[torch.Tensor], Any], comm: Any) -> None:
        self._sum_ = allreduce_sum_
        self._comm = comm
        self._queue: "queue.SimpleQueue[Optional[_Ticket]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="hpc_dgrab-allreduce", daemon=True)
        self._thread.start()

    def submit(self, msg: torch.Tensor) -> _Ticket:
        """Sum ``msg`` over ranks, in place."""
        ticket = _Ticket(msg)
        self._queue.put(ticket)
        return ticket

    def _run(self) -> None:
        while True:
            ticket = self._queue.get()
            if ticket is None:
                return
            try:
                arrived = self._comm.Ibarrier()
                while not arrived.Test():
                    time.sleep(self.POLL_S)
                for piece in ticket.pieces:
                    self._sum_(piece)
            except BaseException as exc:  # handed to the waiting thread
                ticket.error = exc
            finally:
                ticket.done.set()

    def close(self) -> None:
        self._queue.put(None)


def _is_view_of(grad: Optional[torch.Tensor], slot: torch.Tensor) -> bool:
    return grad is not None and grad.data_ptr() == slot.data_ptr() and grad.shape == slot.shape \
        and grad.stride() == slot.stride() and grad.dtype == slot.dtype


class _DistributedMixin:
    """Methods mixed into the subclass of the user's optimizer class (see :func:`DistributedOptimizer`)."""

    # ---------------------------------------------------------------------------- set-up
    def _dist_setup(self, named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]],
                    compression: Any, backend: str, bucket_cap_mb: float,
                    backward_passes_per_step: int, sampler: Any) -> None:
        ctx = api.context("DistributedOptimizer(...)")
        if backward_passes_per_step < 1:
            raise UserError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        if not bucket_cap_mb > 0:
            raise UserError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        params: List[torch.Tensor] = []
        seen = set()
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        names = {id(p): f"param.{i}" for i, p in enumerate(params)}
        if named_parameters is not None:
            given = {id(p): n for n, p in named_parameters}
            missing = [names[id(p)] for p in params if id(p) not in given]
            if missing:
                raise UserError(f"named_parameters does not name {len(missing)} of the optimizer's "
                                f"parameters (first: {missing[0]}); pass model.named_parameters() of the "
                                "model you optimise")
            names = {id(p): given[id(p)] for p in params}
        trainable = [p for p in params if p.requires_grad]
        self._dist_names = [names[id(p)] for p in trainable]
        api.check_same_everywhere([api._describe(names[id(p)], p) for p in trainable],
                                  "DistributedOptimizer: the trainable parameters", ctx.comm)
        self._dist_comm = ctx.comm.Dup()
        self._dist_size = ctx.size
        self._dist_bpps = int(backward_passes_per_step)
        self._dist_payloads: List[Payload] = []
        self._dist_counts: Dict[int, int] = {}
        self._dist_synced = False
        self._dist_skip = False
        self._dist_next = 0           # index of the next bucket to start
        self._dist_in_flight: List[_Bucket] = []
        self._dist_bytes_dense = 0
        self._dist_steps = 0
        self.compression = compression
        self._dist_prescale = compression is None and ctx.size > 1   # see the hook
        self._dist_exchanger = None
        if compression is not None:
            # one adoptable bucket per parameter, in the flat vector's order: the gradients are
            # autograd's own tensors, compensated into the error memory and overwritten with the
            # mean part by part (never a flat copy); the payloads ride in the sparse message
            self._dist_exchanger = self._make_exchanger(compression, backend, trainable)
            groups = [[p] for p in trainable]
            reserve = 0
        else:
            groups = self._bucket_groups(list(reversed(trainable)), bucket_cap_mb)
            reserve = len(trainable) + 16   # the used flags and a few payload entries
        last = trainable[0] if trainable else None   # backward's last: the dtype of an extras-only bucket
        self._dist_buckets = [_Bucket(i, g, (g[0] if g else last).dtype, (g[0] if g else last).device,
                                      reserve if i == len(groups) - 1 else 0)
                              for i, g in enumerate(groups)]
        self._dist_where: Dict[int, Tuple[_Bucket, int]] = {}
        for b in self._dist_buckets:
            for k, p in enumerate(b.params):
                self._dist_where[id(p)] = (b, k)
                with torch.no_grad():
                    if p.grad is not None:
                        b.slot(k).copy_(p.grad)
                p.grad = b.slot(k)
        self._dist_order = [p for b in self._dist_buckets for p in b.params]
        self._dist_backend = None
        self._dist_thread: Optional[_CommThread] = None
        if compression is None and self._dist_buckets:
            from hpc_dgrab.comm.collectives import get_backend

            self._dist_backend = get_backend(backend, self._dist_comm)
        mode = COMM_MODE if backend == "mpi" and ctx.size > 1 else "nonblocking"
        if mode == "thread" and not _thread_multiple():
            mode = "inline"
        self._dist_inline = mode == "inline"
        if mode == "thread" and self._dist_backend is not None:
            self._dist_thread = _CommThread(self._dist_backend.allreduce_, self._dist_comm)
        self._dist_hooks = [p.register_post_accumulate_grad_hook(self._dist_hook) for p in trainable]
        self._dist_sampler = None
        if sampler is not None:
            sampler.attach(self)
        log.debug("DistributedOptimizer: %d trainable tensors in %d bucket(s) on %d ranks",
                  len(trainable), len(self._dist_buckets), ctx.size)

    def _make_exchanger(self, compression: Any, backend: str, trainable: List[torch.Tensor]) -> GradientExchange:
        if backend != "mpi":
            raise UserError(f"compression runs over the MPI sparse all-gather; use backend='mpi' "
                            f"(got {backend!r})")
        if not isinstance(compression, Compressor):
            raise UserError(f"compression must be hpc_dgrab.TopK(...) or hpc_dgrab.RegTopK(...), "
                            f"got {type(compression).__name__}")
        if len({(p.dtype, p.device) for p in trainable}) > 1:
            raise UserError("compression needs every trainable parameter in one dtype on one device")
        from hpc_dgrab.comm.collectives import get_backend

        numel = sum(p.numel() for p in trainable)
        return GradientExchange(get_backend("mpi", self._dist_comm), compression, numel or None,
                                dtype=trainable[0].dtype if trainable else None,
                                device=trainable[0].device if trainable else None)

    @staticmethod
    def _bucket_groups(params: List[torch.Tensor], cap_mb: float) -> List[List[torch.Tensor]]:
        """Consecutive groups of ``params`` (in backward order) of one dtype and device.

        The LAST group (it waits for ``synchronize()`` because it carries the payloads) holds only
        the trailing parameters that fit in ``FINAL_BUCKET_MB``, so that little is left to send
        after backward; it is empty (a message of the payloads alone) when the last parameter is
        large. A parameter of at least ``ALONE_MB`` (or the cap) is a group of its own, so that its
        bucket adopts autograd's gradient. Before the last, as in DDP, the first group closes once
        it reaches ``FIRST_BUCKET_MB`` (communication starts early) and the others at ``cap_mb``.
        """
        def nbytes(p: torch.Tensor) -> int:
            return p.numel() * p.element_size()

        def kind(p: torch.Tensor) -> Tuple[torch.dtype, torch.device]:
            return (p.dtype, p.device)

        if not params:
            return []
        alone = min(ALONE_MB, cap_mb) * 2 ** 20
        tail: List[torch.Tensor] = []
        size = 0
        for p in reversed(params):
            if nbytes(p) >= alone or (tail and kind(p) != kind(tail[0])) \
                    or size + nbytes(p) > min(FINAL_BUCKET_MB, cap_mb) * 2 ** 20:
                break
            tail.insert(0, p)
            size += nbytes(p)
        groups: List[List[torch.Tensor]] = []
        size = 0
        for p in params[:len(params) - len(tail)]:
            cap = min(FIRST_BUCKET_MB if len(groups) == 1 else cap_mb, cap_mb) * 2 ** 20
            if nbytes(p) >= alone:
                groups.append([p])
                size = float("inf")   # closed: the next parameter starts a group
            elif groups and kind(groups[-1][0]) == kind(p) and size < cap:
                groups[-1].append(p)    # DDP's rule: a bucket closes once it has reached its cap
                size += nbytes(p)
            else:
                groups.append([p])
                size = nbytes(p)
        return groups + [tail]

    # ---------------------------------------------------------------------------- the hook
    def _dist_hook(self, p: torch.Tensor) -> None:
        bucket, k = self._dist_where[id(p)]
        if bucket.handle is not None or self._dist_synced:
            raise UserError("a gradient was computed after its all-reduce started (more than "
                            f"backward_passes_per_step={self._dist_bpps} backward passes, or backward "
                            "between synchronize() and step()); call step() or zero_grad() first")
        count = self._dist_counts.get(id(p), 0) + 1
        self._dist_counts[id(p)] = count
        scale = count == self._dist_bpps and self._dist_prescale   # the last pass: divide by ranks
        with torch.no_grad():
            bucket.adopt(p.grad)   # a released one-parameter bucket takes the fresh gradient (no copy)
            slot = bucket.slot(k)
            if not _is_view_of(p.grad, slot):   # fresh (after zero_grad) or replaced by the user
                if scale:
                    torch.div(p.grad, self._dist_size, out=slot)
                else:
                    slot.copy_(p.grad)
                p.grad = slot
            elif scale:
                slot.div_(self._dist_size)
        if count == self._dist_bpps:
            bucket.pending -= 1
            self._launch_ready()
        for b in self._dist_in_flight:      # drive MPI's progress on what is already in flight
            if not b.handle.test():
                break

    def _launch_ready(self) -> None:
        """Start, in index order, every full bucket but the last (the last carries the payloads)."""
        if self._dist_exchanger is not None:
            return
        last = len(self._dist_buckets) - 1
        while self._dist_next < last and self._dist_buckets[self._dist_next].pending == 0:
            self._start(self._dist_buckets[self._dist_next])

    def _start(self, bucket: _Bucket, extra: Optional[List[torch.Tensor]] = None) -> None:
        """Start ``bucket``'s sum; the last one carries ``extra`` (summed, not averaged: exact payloads)."""
        msg = bucket.buf if extra is None else bucket.message_with(extra)
        bucket.message = msg
        # the gradients were divided by the number of ranks in the hooks: a sum gives the mean
        if self._dist_thread is not None:
            bucket.handle = self._dist_thread.submit(msg)
        elif self._dist_inline:   # blocking, right here: no thread hand-off (see COMM_MODE)
            bucket.handle = _Ticket(msg)
            for piece in bucket.handle.pieces:
                self._dist_backend.allreduce_(piece)
            bucket.handle.done.set()
        else:
            bucket.handle = self._dist_backend.allreduce_async_(msg, average=False)
        self._dist_bytes_dense += bucket.message.numel() * bucket.message.element_size()
        self._dist_in_flight.append(bucket)
        self._dist_next = bucket.index + 1

    # ---------------------------------------------------------------------------- public
    def add_payload(self, tensor: torch.Tensor,
                    on_result: Optional[Callable[[torch.Tensor], Any]] = None) -> Payload:
        """Sum ``tensor`` (small, floating) over ranks in this step's gradient message; the sum is in
        the returned object's ``value`` after ``synchronize()``/``step()`` (and passed to ``on_result``).
        Every rank must add payloads of the same sizes in the same order in a step."""
        if self._dist_synced:
            raise UserError("add_payload() after synchronize(): add payloads before the step's synchronize()")
        payload = Payload(torch.as_tensor(tensor), on_result)
        self._dist_payloads.append(payload)
        return payload

    def buffer_bytes(self) -> Dict[str, int]:
        """Bytes this wrapper holds between steps, by purpose: ``gradients`` (the buckets the
        ``.grad`` views point into, with the last one's payload reserve) and ``compression`` (error
        memory, workspaces and compressor state; 0 without compression)."""
        return {"gradients": sum(b.store.nbytes for b in self._dist_buckets if b.held),
                "compression": 0 if self._dist_exchanger is None else self._dist_exchanger.buffer_bytes()}

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank handed to the network for gradients and payloads (cumulative)."""
        if self._dist_exchanger is not None:
            return int(self._dist_exchanger.bytes_sent)
        return int(self._dist_bytes_dense)

    def _extra_parts(self) -> List[torch.Tensor]:
        """[payloads..., used flags]: what rides with the last message of the step."""
        used = torch.tensor([1.0 if self._dist_counts.get(id(p), 0) else 0.0 for p in self._dist_order],
                            dtype=torch.float64)
        return [p.tensor for p in self._dist_payloads] + [used]

    def synchronize(self) -> None:
        """Finish this step's gradient exchange: afterwards every ``.grad`` is the mean over ranks.

        Zero-fills the gradients this rank did not produce, starts the remaining buckets in order
        and waits for all of them. Use it before gradient clipping, then ``with opt.skip_synchronize():
        opt.step()``."""
        api.context("DistributedOptimizer.synchronize()/step()")
        if self._dist_synced:
            return
        for b in self._dist_buckets[self._dist_next:]:
            for k, p in enumerate(b.params):
                count = self._dist_counts.get(id(p), 0)
                if count == 0:
                    b.slot(k).zero_()
                    if not _is_view_of(p.grad, b.slot(k)):
                        p.grad = b.slot(k)
                elif count < self._dist_bpps and self._dist_prescale:   # fewer passes than promised
                    b.slot(k).div_(self._dist_size)
        parts = self._extra_parts()
        n_pay = sum(t.numel() for t in parts) - len(self._dist_order)
        if self._dist_exchanger is not None:
            extra_sum = self._exchange_compressed(parts)
        else:
            extra_sum = self._exchange_dense(parts)
        used = extra_sum[n_pay:]
        offset = 0
        for pl in self._dist_payloads:
            pl.value = extra_sum[offset:offset + pl.numel].to(pl.tensor.dtype).view_as(pl.tensor)
            offset += pl.numel
        for p, u in zip(self._dist_order, used.tolist()):
            if u == 0:
                p.grad = None   # no rank produced a gradient: as in one process, the optimizer skips it
        self._dist_synced = True
        for pl in self._dist_payloads:
            if pl.on_result is not None:
                pl.on_result(pl.value)

    def _exchange_dense(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """The sum of ``[parts...]`` over ranks: a view into the last bucket's message (no copy)."""
        if not self._dist_buckets:   # nothing trainable: the extras still travel (one all-reduce)
            from hpc_dgrab.comm.collectives import allreduce_

            extra = torch.cat([t.to(torch.float64) for t in parts])
            allreduce_(extra, comm=self._dist_comm)
            self._dist_bytes_dense += extra.numel() * extra.element_size()
            return extra
        last = self._dist_buckets[-1]
        while self._dist_next < last.index:
            self._start(self._dist_buckets[self._dist_next])
        self._start(last, parts)
        for b in self._dist_in_flight:
            b.handle.wait()
        return last.message[last.numel:]

    def _exchange_compressed(self, parts: List[torch.Tensor]) -> torch.Tensor:
        if not self._dist_buckets:
            raise UserError("compression needs at least one trainable parameter")
        grads = [b.buf for b in self._dist_buckets]   # every one filled by synchronize()
        extra = torch.cat([t.reshape(-1).to(grads[0].dtype) for t in parts])
        extra_sum = self._dist_exchanger.mean_(grads, extra)
        assert extra_sum is not None
        return extra_sum

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """``step()`` inside this context does not synchronize (you called ``synchronize()`` already)."""
        self._dist_skip = True
        try:
            yield
        finally:
            self._dist_skip = False

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Synchronize (unless inside ``skip_synchronize()`` or already done), then the optimizer's step."""
        if not self._dist_skip:
            self.synchronize()
        elif not self._dist_synced:
            raise UserError("step() inside skip_synchronize() without synchronize() first")
        loss = super().step(closure)
        self._dist_reset()
        self._dist_steps += 1
        return loss

    def _dist_reset(self) -> None:
        for b in self._dist_buckets:
            b.pending = len(b.params)
            b.handle = None
            b.message = None
        if self._dist_buckets:
            self._dist_buckets[-1].shrink()
        self._dist_in_flight = []
        self._dist_next = 0
        self._dist_counts = {}
        self._dist_payloads = []
        self._dist_synced = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients as torch does: ``set_to_none=True`` sets them to None (the next
        backward's gradients are then written into the buckets by the hooks, one pass each);
        ``set_to_none=False`` zero-fills the buckets, and ``.grad`` stays a view into them."""
        if self._dist_in_flight and not self._dist_synced:
            for b in self._dist_in_flight:
                b.handle.wait()    # never zero a buffer MPI is still reducing
        for b in self._dist_buckets:
            if not set_to_none:
                b.store[:b.numel].zero_()
            for k, p in enumerate(b.params):
                if set_to_none:
                    p.grad = None
                    b.release()
                elif not _is_view_of(p.grad, b.slot(k)):
                    p.grad = b.slot(k)
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._dist_where and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()
        if self._dist_in_flight or self._dist_counts:
            self._dist_reset()

    def state_dict(self) -> Dict[str, Any]:
        """The optimizer's ``state_dict()`` plus this wrapper's (compression memory, counters)."""
        state = super().state_dict()
        state[STATE_KEY] = {"bytes_sent": self.bytes_sent, "steps": self._dist_steps,
                            "compression": None if self._dist_exchanger is None
                            else self._dist_exchanger.state_dict()}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        mine = state_dict.pop(STATE_KEY, None)
        super().load_state_dict(state_dict)
        if mine is None:
            return
        self._dist_steps = int(mine.get("steps", 0))
        if self._dist_exchanger is not None and mine.get("compression") is not None:
            try:
                self._dist_exchanger.load_state_dict(mine["compression"])
            except ValueError as exc:
                raise UserError(str(exc)) from None
        elif self._dist_exchanger is None:
            self._dist_bytes_dense = int(mine.get("bytes_sent", 0))

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the optimizer then behaves like the plain one, without sync)."""
        for h in self._dist_hooks:
            h.remove()
        self._dist_hooks = []
        if self._dist_thread is not None:
            self._dist_thread.close()
            self._dist_thread = None


def _thread_multiple() -> bool:
    from mpi4py import MPI

    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def subclass_instance(optimizer: torch.optim.Optimizer, mixin: type) -> Any:
    """An object of a new subclass ``(mixin, type(optimizer))`` sharing ``optimizer``'s param groups,
    state, hooks and defaults; not methods bound to the original object (an LR scheduler wraps
    ``optimizer.step`` on the instance: that one would bypass the mixin's ``step``)."""
    base = type(optimizer)
    cls = type(base.__name__, (mixin, base), {"__module__": base.__module__})
    obj = cls.__new__(cls)
    obj.__dict__.update({k: v for k, v in optimizer.__dict__.items()
                         if not (callable(v) and hasattr(base, k))})
    return obj


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
                         compression: Optional[Any] = None, backend: str = "mpi",
                         bucket_cap_mb: float = 25, backward_passes_per_step: int = 1,
                         sampler: Optional[Any] = None) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` uses the mean gradient over all ranks (see the module doc).

    ``named_parameters``: ``model.named_parameters()`` (names appear in error messages and the
    cross-rank check); ``compression``: None, :class:`TopK` or :class:`RegTopK`; ``backend``:
    ``"mpi"`` or ``"horovod"``; ``bucket_cap_mb``: bucket size; ``backward_passes_per_step``: local
    gradient accumulation before each exchange; ``sampler``: an :class:`~hpc_dgrab.OrderedSampler`
    whose order data then rides in the gradient message. Collective: every rank calls it; ranks
    whose trainable parameters differ get the same one-line UserError.
    """
    api.context("DistributedOptimizer(...)")
    obj = subclass_instance(optimizer, _DistributedMixin)
    obj._dist_setup(named_parameters, compression, backend, bucket_cap_mb, backward_passes_per_step, sampler)
    return obj
