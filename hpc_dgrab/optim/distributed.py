"""``DistributedOptimizer``: synchronous data-parallel SGD inside the user's own training loop.

    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters())
    opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

Contract:

* The result is an object of a *subclass of the user's optimizer class* sharing its param groups and
  state (``isinstance``, LR schedulers and ``state_dict`` keep working). Collective: every rank
  calls it; ranks whose trainable parameters differ get the same one-line ``UserError``.
* Trainable parameters (``requires_grad``) are laid out in buckets (:mod:`hpc_dgrab.optim.buckets`);
  each ``.grad`` is a view into its bucket. A hook on each parameter counts its gradients; when every
  parameter of a bucket has its ``backward_passes_per_step`` gradients, the bucket's non-blocking sum
  starts (through the dense :class:`~hpc_dgrab.compress.GradientExchange`), strictly in bucket order
  on every rank, while backward goes on. The hooks divide by the number of ranks, so the sum is the
  mean.
* ``synchronize()`` (called by ``step()``) zero-fills the gradients this rank did not produce,
  starts the remaining buckets and waits for all. The last bucket also carries the step's payloads
  and one "used" flag per parameter: a parameter no rank produced a gradient for gets
  ``.grad = None`` (the optimizer skips it, as in one process).
* Communication goes through a transport of :mod:`hpc_dgrab.comm` (``backend``: "mpi", "horovod",
  or ``torch.distributed``'s "gloo", "nccl", "torch" = its default) on a private duplicate of the
  ``init`` communicator (a private process group for torch); it is closed when the optimizer is
  collected (and by ``hd.shutdown()``).
* Payload channel: ``add_payload(tensor, on_result=None)`` before ``step()``/``synchronize()`` sums
  ``tensor`` over ranks in the SAME message as the gradient, in the gradient's dtype; afterwards the
  returned :class:`Payload`'s ``value`` holds the sum (on the dense path a view into the message,
  valid until the next ``synchronize()``) and ``on_result(value)`` is called. Every rank adds
  payloads of the same sizes in the same order in a step.
* ``compression=hd.TopK(...)`` or ``hd.RegTopK(...)``: one sparse all-gather of the
  error-compensated selection of the whole gradient in ``step()`` (each ``.grad`` stays autograd's
  own tensor and is overwritten with its part of the mean); payloads ride as its extra field; the
  ranks' parameters stay bit-identical. The error memory and last selection are in
  ``state_dict()["hpc_dgrab"]["compression"]``.
* Checked across ranks (:mod:`~hpc_dgrab.optim.agreement`; a mismatch is the same one-line
  ``UserError`` on every rank, never a hang): backend, compression, ``backward_passes_per_step``,
  the bucket plan, payload sizes; and more ``backward()`` calls than ``backward_passes_per_step``
  before ``step()`` on any rank is refused (as Horovod does), not summed.
* ``bytes_sent``: the bytes this rank handed to the network (message sizes, cumulative).
* Horovod's keywords (``op``, ``gradient_predivide_factor``, ``num_groups``/``groups``,
  ``process_set``, ``compression=hd.Compression.fp16``...): :mod:`hpc_dgrab.optim.options`.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from hpc_dgrab import api
from hpc_dgrab.compress import GradientExchange
from hpc_dgrab.compress.cast import CastReducer
from hpc_dgrab.errors import UserError, UserValueError
from hpc_dgrab.ops.reduce_ops import Average
from hpc_dgrab.optim import agreement, options
from hpc_dgrab.optim.buckets import Bucket, Payload, is_view_of
from hpc_dgrab.optim.subclass import subclass_instance

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from hpc_dgrab.optim.options import GroupsArg, SyncOptions
    from hpc_dgrab.optim.sampler import OrderedSampler
    from hpc_dgrab.sets import ProcessSetLike

log = logging.getLogger(__name__)

__all__ = ["DistributedOptimizer", "Payload", "subclass_instance"]

STATE_KEY = "hpc_dgrab"


@dataclass
class _SyncState:
    """Everything the wrapper adds to the optimizer, as its one attribute ``_sync``."""

    # set-up (fixed)
    exchange: GradientExchange
    size: int                                   # ranks
    passes: int                                 # backward passes per step
    prescale: bool                              # the hooks divide by ``divide`` (dense)
    divide: float                               # Average: ranks (or the predivide factor)
    post: float                                 # the sum is multiplied by this (1.0: not)
    cast: Optional[CastReducer]                 # fp16/bf16 dense sums, else None
    buckets: List[Bucket]
    where: Dict[int, Tuple[Bucket, int]]        # id(param) -> (its bucket, its index there)
    order: List[torch.Tensor]                   # the parameters in bucket order (the used flags)
    hooks: List[RemovableHandle] = field(default_factory=list)
    # this step
    counts: Dict[int, int] = field(default_factory=dict)     # id(param) -> gradients seen
    payloads: List[Payload] = field(default_factory=list)
    next: int = 0                               # index of the next bucket to start
    in_flight: List[Bucket] = field(default_factory=list)
    synced: bool = False
    skip: bool = False
    extra: bool = False                         # more backward passes than ``passes`` (reported)
    # across steps
    steps: int = 0
    late: bool = False                          # a backward between synchronize() and step()
    layout: Optional[Tuple[int, ...]] = None    # the payload sizes last checked across ranks
    sparse: List[torch.Tensor] = field(default_factory=list)  # sparse .grad this step: sparse again

    @property
    def compressed(self) -> bool:
        return self.exchange.compression is not None


def _hook(ref: weakref.ReferenceType[Any], p: torch.Tensor) -> None:
    opt = ref()
    if opt is not None:
        opt._on_grad(p)


def _close(hooks: List[RemovableHandle], exchange: GradientExchange, cast: Optional[CastReducer]) -> None:
    """The finalizer: detach the hooks, close the transport (its thread ends)."""
    for h in hooks:
        h.remove()
    hooks.clear()
    exchange.transport.close()
    if cast is not None:
        cast.close()


class _DistributedMixin:
    """Methods mixed into the subclass of the user's optimizer class (see :func:`DistributedOptimizer`)."""

    _sync: _SyncState

    # ---------------------------------------------------------------------------- set-up
    def _setup_sync(self, named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]],
                    compression: Any, backend: Optional[str], bucket_cap_mb: float,
                    backward_passes_per_step: int, opts: SyncOptions, num_groups: int = 0,
                    groups: GroupsArg = None) -> None:
        comm = opts.comm
        if backward_passes_per_step < 1:
            raise UserError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        if not bucket_cap_mb > 0:
            raise UserError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        params: List[torch.Tensor] = []
        seen = set()
        for group in self.param_groups:  # type: ignore[attr-defined]
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        names = {id(p): f"param.{i}" for i, p in enumerate(params)}
        if named_parameters is not None:
            pairs = list(named_parameters)
            given = {id(p): n for n, p in pairs}
            dup = sorted({n for n, _ in pairs if sum(1 for m, _ in pairs if m == n) > 1})
            if dup:
                raise UserValueError(f"named_parameters has duplicate names ({', '.join(dup[:3])}); "
                                     "give every parameter its own name")
            missing = [names[id(p)] for p in params if id(p) not in given]
            if missing:
                raise UserValueError(f"named_parameters does not name {len(missing)} of the optimizer's "
                                f"parameters (first: {missing[0]}); pass model.named_parameters() of the "
                                "model you optimise")
            names = {id(p): given[id(p)] for p in params}
        self._parameter_names = {p: names[id(p)] for p in params}   # Horovod's attribute
        trainable = [p for p in params if p.requires_grad]
        api.check_same_everywhere([api._describe(names[id(p)], p) for p in trainable],
                                  "DistributedOptimizer: the trainable parameters", comm)
        self.compression = compression
        from hpc_dgrab.comm import choose_backend  # None: hd.init's, else NCCL for CUDA, else MPI

        backend = choose_backend(backend, trainable[0].device if trainable else None)
        # compressed: one adoptable bucket per parameter, in the flat vector's order (autograd's own
        # tensors, compensated and overwritten with the mean part by part); payloads in the message
        compression = opts.sparse
        plan = [[p] for p in trainable] if compression is not None else \
            options.plan_groups(trainable, num_groups, groups, bucket_cap_mb)
        agreement.check_settings(backend, opts.sparse or opts.cast, int(backward_passes_per_step), plan, comm)
        if compression is not None:
            exchange = options.compressed_exchange(compression, backend, trainable, comm)
            reserve = 0
        else:
            from hpc_dgrab.comm import get_transport

            exchange = GradientExchange(get_transport(backend, comm))
            reserve = len(trainable) + agreement.N_FLAGS + 16   # used and step flags, a few payloads
        cast = CastReducer(opts.cast, comm) if opts.cast is not None and comm.size > 1 else None
        buckets: List[Bucket] = []
        for i, g in enumerate(plan):
            # an extras-only (empty) last group takes backward's last parameter's dtype and device;
            # there are groups only when something is trainable
            like = g[0] if g else trainable[0]
            buckets.append(Bucket(i, g, like.dtype, like.device, reserve if i == len(plan) - 1 else 0))
        where: Dict[int, Tuple[Bucket, int]] = {}
        for b in buckets:
            for k, p in enumerate(b.params):
                where[id(p)] = (b, k)
                with torch.no_grad():
                    if p.grad is not None:
                        b.slot(k).copy_(p.grad)
                p.grad = b.slot(k)
        self._sync = _SyncState(exchange=exchange, size=comm.size, passes=int(backward_passes_per_step),
                                prescale=compression is None and opts.divide != 1.0, divide=opts.divide,
                                post=opts.post, cast=cast, buckets=buckets, where=where,
                                order=[p for b in buckets for p in b.params])
        ref = weakref.ref(self)
        self._sync.hooks = [p.register_post_accumulate_grad_hook(lambda q, ref=ref: _hook(ref, q))
                            for p in trainable]
        weakref.finalize(self, _close, self._sync.hooks, exchange, cast)
        log.debug("DistributedOptimizer: %d trainable tensors in %d bucket(s) on %d ranks",
                  len(trainable), len(buckets), comm.size)

    # ---------------------------------------------------------------------------- the hook
    def _on_grad(self, p: torch.Tensor) -> None:
        st = self._sync
        bucket, k = st.where[id(p)]
        if st.synced:   # reported on every rank in the next step's message (never raised here)
            st.late = True
            return
        count = st.counts.get(id(p), 0) + 1
        st.counts[id(p)] = count
        if count > st.passes:   # reported on every rank by synchronize() (never raised here)
            st.extra = True
            return
        scale = count == st.passes and st.prescale   # the last pass: divide by ranks
        grad = p.grad
        assert grad is not None   # a post-accumulate-grad hook runs after autograd has set .grad
        if grad.layout != torch.strided:   # sparse (e.g. an Embedding's): summed dense, given back sparse
            grad = grad.to_dense()
            st.sparse.append(p)
        with torch.no_grad():
            bucket.adopt(grad)   # a released one-parameter bucket takes the fresh gradient (no copy)
            slot = bucket.slot(k)
            if not is_view_of(grad, slot):   # fresh (after zero_grad) or replaced by the user
                if scale:
                    torch.div(grad, st.divide, out=slot)
                else:
                    slot.copy_(grad)
                p.grad = slot
            elif scale:
                slot.div_(st.divide)
        if count == st.passes:
            bucket.pending -= 1
            self._launch_ready()
        for b in st.in_flight:      # drive the progress of what is already in flight
            if b.handle is not None and not b.handle.test():
                break

    def _launch_ready(self) -> None:
        """Start, in index order, every full bucket but the last (the last carries the payloads)."""
        st = self._sync
        if st.compressed:
            return
        last = len(st.buckets) - 1
        while st.next < last and st.buckets[st.next].pending == 0:
            self._start(st.buckets[st.next])

    def _start(self, bucket: Bucket, extra: Optional[List[torch.Tensor]] = None) -> None:
        """Start ``bucket``'s sum; the last one carries ``extra`` (summed, not averaged: exact payloads)."""
        st = self._sync
        msg = bucket.buf if extra is None else bucket.message_with(extra)
        bucket.message = msg
        # the gradients were divided by the number of ranks in the hooks: a sum gives the mean
        if st.cast is not None:
            bucket.handle = st.cast.start(msg, bucket.numel)
        else:
            bucket.handle = st.exchange.start(msg)
        st.in_flight.append(bucket)
        st.next = bucket.index + 1

    # ---------------------------------------------------------------------------- public
    def add_payload(self, tensor: torch.Tensor,
                    on_result: Optional[Callable[[torch.Tensor], Any]] = None) -> Payload:
        """Sum ``tensor`` (small, floating) over ranks in this step's gradient message; the sum is in
        the returned object's ``value`` after ``synchronize()``/``step()`` (and passed to ``on_result``).
        Every rank must add payloads of the same sizes in the same order in a step."""
        if self._sync.synced:
            raise UserError("add_payload() after synchronize(): add payloads before the step's synchronize()")
        payload = Payload(torch.as_tensor(tensor), on_result)
        self._sync.payloads.append(payload)
        return payload

    def buffer_bytes(self) -> Dict[str, int]:
        """Bytes this wrapper holds between steps, by purpose: ``gradients`` (the buckets the
        ``.grad`` views point into, with the last one's payload reserve) and ``compression`` (error
        memory, workspaces and compressor state; 0 without compression)."""
        return {"gradients": sum(b.store.nbytes for b in self._sync.buckets if b.held),
                "compression": self._sync.exchange.buffer_bytes()}

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank handed to the network for gradients and payloads (cumulative)."""
        cast = self._sync.cast
        return int(self._sync.exchange.bytes_sent) + (cast.bytes_sent if cast is not None else 0)

    def _extra_parts(self, changed: bool) -> List[torch.Tensor]:
        """[payloads (zeros of the agreed sizes if this rank's changed)..., used flags, step flags]."""
        st = self._sync
        used = torch.tensor([1.0 if st.counts.get(id(p), 0) else 0.0 for p in st.order], dtype=torch.float64)
        pay = [torch.zeros(sum(st.layout or ()))] if changed else [p.tensor for p in st.payloads]
        return pay + [used, agreement.flags(st.extra, st.late, changed)]

    def synchronize(self) -> None:
        """Finish this step's gradient exchange: afterwards every ``.grad`` is the mean over ranks.

        Zero-fills the gradients this rank did not produce, starts the remaining buckets in order
        and waits for all of them. Use it before gradient clipping, then ``with opt.skip_synchronize():
        opt.step()``."""
        api.context("DistributedOptimizer.synchronize()/step()")
        st = self._sync
        if st.synced:
            return
        for b in st.buckets[st.next:]:
            for k, p in enumerate(b.params):
                count = st.counts.get(id(p), 0)
                if count == 0:
                    b.slot(k).zero_()
                    if not is_view_of(p.grad, b.slot(k)):
                        p.grad = b.slot(k)
                elif count < st.passes and st.prescale:   # fewer passes than promised
                    b.slot(k).div_(st.divide)
        layout = tuple(pl.numel for pl in st.payloads)
        if st.layout is None:   # the first step: every rank checks the payload sizes
            st.layout = agreement.check_layout(layout, st.exchange.transport) if st.size > 1 else layout
        changed = layout != st.layout   # then the message keeps the agreed size (flagged)
        parts = self._extra_parts(changed)
        n_pay = sum(t.numel() for t in parts) - len(st.order) - agreement.N_FLAGS
        extra_sum = self._exchange_compressed(parts) if st.compressed else self._exchange_dense(parts)
        used = extra_sum[n_pay:n_pay + len(st.order)]
        flags = extra_sum[n_pay + len(st.order):].tolist()
        problem = agreement.passes_error(flags, st.passes, st.size)
        st.late = False
        if problem is None and flags[2] > 0:   # some rank's sizes changed: every rank checks
            problem, sums = agreement.new_layout(layout, [p.tensor for p in st.payloads], used, st.exchange)
            if sums is not None:   # the same new sizes on every rank, summed apart this once
                st.layout, extra_sum, n_pay = layout, torch.cat([sums, used]), sums.numel()
        if problem is not None:   # the same on every rank: every rank raises it
            self._reset()
            raise UserError(problem, collective=True)
        if st.post != 1.0:   # Horovod's postscale (gradient_predivide_factor; op=Sum when compressed)
            for b in st.buckets:
                b.buf.mul_(st.post)
        offset = 0
        for pl in st.payloads:
            pl.value = extra_sum[offset:offset + pl.numel].to(pl.tensor.dtype).view_as(pl.tensor)
            offset += pl.numel
        for p, u in zip(st.order, used.tolist()):
            if u == 0:
                p.grad = None   # no rank produced a gradient: as in one process, the optimizer skips it
        st.synced = True
        for pl in st.payloads:
            if pl.on_result is not None:
                assert pl.value is not None   # set above for every payload of the step
                pl.on_result(pl.value)

    def _exchange_dense(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """The sum of ``[parts...]`` over ranks: a view into the last bucket's message (no copy)."""
        st = self._sync
        if not st.buckets:   # nothing trainable: the extras still travel (one sum)
            return st.exchange.sum_(torch.cat([t.to(torch.float64) for t in parts]))
        last = st.buckets[-1]
        while st.next < last.index:
            self._start(st.buckets[st.next])
        self._start(last, parts)
        for b in st.in_flight:
            assert b.handle is not None
            b.handle.wait()
        assert last.message is not None
        return last.message[last.numel:]

    def _exchange_compressed(self, parts: List[torch.Tensor]) -> torch.Tensor:
        st = self._sync
        if not st.buckets:
            raise UserError("compression needs at least one trainable parameter")
        grads = [b.buf for b in st.buckets]   # every one filled by synchronize()
        extra_sum = st.exchange.mean_(grads, torch.cat([t.reshape(-1).to(grads[0].dtype) for t in parts]))
        assert extra_sum is not None
        return extra_sum

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """``step()`` inside this context does not synchronize (you called ``synchronize()`` already)."""
        self._sync.skip = True
        try:
            yield
        finally:
            self._sync.skip = False

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Synchronize (unless inside ``skip_synchronize()`` or already done), then the optimizer's step."""
        if not self._sync.skip:
            if self._sync.synced:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() after "
                              "optimizer.synchronize(): wrap step() in `with opt.skip_synchronize():`",
                              stacklevel=2)
            self.synchronize()
        elif not self._sync.synced:
            raise UserError("step() inside skip_synchronize() without synchronize() first")
        for p in self._sync.sparse:   # the layout torch gave: sparse gradients stay sparse
            if p.grad is not None:
                p.grad = p.grad.to_sparse()
        self._sync.sparse.clear()
        loss = super().step(closure)  # type: ignore[misc]
        self._reset()
        self._sync.steps += 1
        return loss

    def _reset(self) -> None:
        st = self._sync
        for b in st.buckets:
            b.pending = len(b.params)
            b.handle = None
            b.message = None
        if st.buckets:
            st.buckets[-1].shrink()
        st.in_flight = []
        st.next = 0
        st.counts = {}
        st.payloads = []
        st.synced = False
        st.extra = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients as torch does: ``set_to_none=True`` sets them to None (the next
        backward's gradients are then written into the buckets by the hooks, one pass each);
        ``set_to_none=False`` zero-fills the buckets, and ``.grad`` stays a view into them."""
        st = self._sync
        if st.in_flight and not st.synced:
            for b in st.in_flight:
                assert b.handle is not None
                b.handle.wait()    # never zero a buffer that is still being reduced
        for b in st.buckets:
            if not set_to_none:
                b.store[:b.numel].zero_()
            for k, p in enumerate(b.params):
                if set_to_none:
                    p.grad = None
                    b.release()
                elif not is_view_of(p.grad, b.slot(k)):
                    p.grad = b.slot(k)
        for group in self.param_groups:  # type: ignore[attr-defined]
            for p in group["params"]:
                if id(p) not in st.where and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()
        if st.in_flight or st.counts:
            self._reset()

    def state_dict(self) -> Dict[str, Any]:
        """The optimizer's ``state_dict()`` plus this wrapper's (compression memory, counters)."""
        state = super().state_dict()  # type: ignore[misc]
        st = self._sync
        state[STATE_KEY] = {"bytes_sent": self.bytes_sent, "steps": st.steps,
                            "compression": st.exchange.state_dict() if st.compressed else None}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        mine = state_dict.pop(STATE_KEY, None)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if mine is None:
            return
        st = self._sync
        st.steps = int(mine.get("steps", 0))
        if st.compressed and mine.get("compression") is not None:
            try:
                st.exchange.load_state_dict(mine["compression"])
            except ValueError as exc:
                raise UserError(str(exc)) from None
        elif not st.compressed:
            st.exchange.bytes_sent = int(mine.get("bytes_sent", 0))

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the optimizer then behaves like the plain one, without sync)."""
        for h in self._sync.hooks:
            h.remove()
        self._sync.hooks.clear()


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
                         compression: Any = None, backward_passes_per_step: int = 1, op: int = Average,
                         gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups: GroupsArg = None, sparse_as_dense: bool = False,
                         process_set: Optional[ProcessSetLike] = None, *,
                         backend: Optional[str] = None, bucket_cap_mb: float = 25,
                         sampler: Optional[OrderedSampler] = None) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` uses the mean gradient over all ranks (module docstring).

    Horovod's keywords (:mod:`hpc_dgrab.optim.options`): ``named_parameters``
    (``model.named_parameters()``: names in error messages and the cross-rank check);
    ``compression``: None, ``hd.Compression.none/fp16/bf16``, :class:`~hpc_dgrab.TopK` or
    :class:`~hpc_dgrab.RegTopK`; ``backward_passes_per_step``: local gradient accumulation before
    each exchange; ``op``: ``hd.Average`` or ``hd.Sum``; ``gradient_predivide_factor``;
    ``num_groups``/``groups``: the message plan; ``sparse_as_dense`` (sparse gradients are always
    summed dense here); ``process_set``: average over its ranks only. Ours, keyword-only:
    ``backend``: "mpi", "horovod", "gloo", "nccl" or "torch" (compression: not "horovod"), None:
    ``hd.init(backend=...)``'s, else NCCL for CUDA parameters when NCCL is available, else MPI;
    ``bucket_cap_mb``: bucket size; ``sampler``: an :class:`~hpc_dgrab.OrderedSampler`, handed
    this optimizer (``sampler.attach(opt)``) so that its order data rides in the gradient message.
    """
    ctx = api.context("DistributedOptimizer(...)")
    from hpc_dgrab.comm import choose_backend  # None: hd.init's, else NCCL for CUDA, else MPI

    first = next((p for g in optimizer.param_groups for p in g["params"] if p.requires_grad), None)
    backend = choose_backend(backend, first.device if first is not None else None)
    opts = options.resolve(compression, op, gradient_predivide_factor, backend, process_set, ctx.comm)
    obj = subclass_instance(optimizer, _DistributedMixin)
    obj._setup_sync(named_parameters, compression, backend, bucket_cap_mb, backward_passes_per_step, opts,
                    num_groups, groups)
    if sampler is not None:
        sampler.attach(obj)
    return obj
