"""Top-k and RegTop-k with error feedback as communication hooks of torch's
``DistributedDataParallel``.

Contract::

    import hpc_dgrab.ddp as hdd
    state = hdd.RegTopKState(process_group=None, density=0.01, start_iter=2, mu=4.0)
    ddp_model.register_comm_hook(state, hdd.regtopk_hook)      # or hdd.register(ddp_model, state)

* :class:`TopKState` / :class:`RegTopKState` hold the settings and, per DDP bucket (keyed by
  ``bucket.index()``), one :class:`~hpc_dgrab.compress.exchange.SparseWorker`: the error memory
  and the compressor's state. ``density`` must lie in (0, 1]; ``start_iter`` >= 2, since DDP
  rebuilds its buckets after the first iteration and memory kept before that would not line up.
  Iterations before ``start_iter`` are a plain all-reduce of the mean.
* :func:`topk_hook` / :func:`regtopk_hook` (``(state, bucket) -> Future[Tensor]``): each rank
  selects k = round(density * bucket size) entries of its error-compensated bucket; k is the same
  on every rank, so one ``all_gather_single`` (``all_gather_into_tensor`` on older torch) of
  fixed-size (indices, values) messages moves them (packed on the bucket's device by
  :func:`hpc_dgrab.comm.sparse.pack_tensor`, int32 indices: no host copy); every rank sums the
  messages in rank order into the dense mean (bit-identical on every rank) and updates its memory.
  They compose with torch's ``fp16_compress_wrapper`` and ``bf16_compress_wrapper``: the values
  then travel in that dtype, while selection, sum and memory stay in float32.
* A state pickles (``pickle``, ``torch.save``) with its memory and counters; the process group is
  dropped and is the default group after loading. A bucket's memory is in the bucket's layout (its
  parameters' shapes in order, recorded): where a bucket is laid out otherwise (a new DDP model's
  first iteration, before it rebuilds its buckets in the order gradients became ready) that bucket
  is plainly all-reduced and its memory kept for later. A resumed run therefore continues
  identically when the layout does not change, e.g. ``find_unused_parameters=True`` (no rebuild).
* :func:`register` registers a state's hook and refuses a second hook on the same model with a
  one-line :class:`~hpc_dgrab.errors.UserError`; misuse of the settings is a one-line UserError.
"""
import logging
import numbers
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from hpc_dgrab.comm import wire
from hpc_dgrab.comm.sparse import pack_tensor, unpack_tensor
from hpc_dgrab.compress.base import Compressor
from hpc_dgrab.compress.exchange import SparseWorker, scatter_sum_
from hpc_dgrab.compress.regtopk import RegTopK
from hpc_dgrab.compress.topk import TopK
from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["TopKState", "RegTopKState", "topk_hook", "regtopk_hook", "register"]

#: the earliest iteration at which compression may start (DDP rebuilds its buckets after iteration 1)
MIN_START_ITER = 2

#: what a DDP communication hook returns
Future = torch.futures.Future[torch.Tensor]
Hook = Callable[[Any, Any], Future]
#: a bucket's layout: its parameters' shapes in bucket order
Layout = Tuple[Tuple[int, ...], ...]


def _check_density(density: Any) -> float:
    ok = isinstance(density, numbers.Real) and not isinstance(density, bool)
    if not ok or not 0.0 < float(density) <= 1.0:
        raise UserError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)


def _check_start_iter(start_iter: Any) -> int:
    if not isinstance(start_iter, numbers.Integral) or isinstance(start_iter, bool) \
            or int(start_iter) < MIN_START_ITER:
        raise UserError(f"start_iter must be an integer >= {MIN_START_ITER} (DDP rebuilds its buckets "
                        f"after iteration 1), got {start_iter!r}")
    return int(start_iter)


class _SparseState:
    """What the two states share; see the module docstring."""

    __slots__ = (
        # --- where: the group the buckets are averaged over (None: the default group)
        "process_group",
        # --- the settings: the fraction of each bucket sent, the first compressed iteration
        "density",
        "start_iter",
        # --- progress: iterations finished (counted at the last bucket of each one)
        "iter",
        # --- memory: bucket index -> SparseWorker (error feedback + compressor state), made on use
        "workers",
        # --- bucket index -> the parameter shapes, in bucket order, of the layout its memory is in
        "layouts",
        # --- accounting: bytes this rank handed to the collectives (dense and sparse)
        "bytes_sent",
    )

    def __init__(self, process_group: Any = None, density: float = 0.01,
                 start_iter: int = MIN_START_ITER) -> None:
        self.process_group = process_group
        self.density = _check_density(density)
        self.start_iter = _check_start_iter(start_iter)
        self.iter = 0
        self.workers: Dict[int, SparseWorker] = {}
        self.layouts: Dict[int, Layout] = {}
        self.bytes_sent = 0
        log.debug("%s: density %g, compression from iteration %d", type(self).__name__,
                  self.density, self.start_iter)

    def make_compressor(self) -> Compressor:
        raise NotImplementedError

    @property
    def compressing(self) -> bool:
        """Whether the current iteration is compressed."""
        return self.iter >= self.start_iter

    def maybe_increase_iter(self, bucket: Any) -> None:
        """Count an iteration when its last bucket is handed to the hook."""
        if bucket.is_last():
            self.iter += 1
            if self.iter == self.start_iter:
                log.info("%s: compression starts at iteration %d", type(self).__name__, self.iter)

    def worker(self, index: int, buffer: torch.Tensor, layout: Layout) -> Optional[SparseWorker]:
        """The worker of bucket ``index`` (made on first use), or None when the bucket's layout is not
        the one its memory was kept in (the memory is left as it is)."""
        w = self.workers.get(index)
        if w is None:
            self.layouts[index] = layout
            w = self.workers[index] = SparseWorker(self.make_compressor(), buffer.numel(), None,
                                                   buffer.dtype, buffer.device)
        elif self.layouts.get(index) != layout or w.numel != buffer.numel():
            log.warning("DDP bucket %d is not laid out as its error memory (a new DDP model before it "
                        "rebuilt its buckets, or other bucket sizes): plain all-reduce for it", index)
            return None
        return w

    def _slot_names(self) -> Tuple[str, ...]:
        names: Tuple[str, ...] = ()
        for cls in reversed(type(self).__mro__):
            names += tuple(getattr(cls, "__slots__", ()))
        return names

    def __getstate__(self) -> Dict[str, Any]:
        """Everything but the process group; each worker as (numel, dtype, its state dict)."""
        out = {n: getattr(self, n) for n in self._slot_names() if n not in ("process_group", "workers")}
        out["workers"] = {i: (w.numel, w.memory.error.dtype, w.state_dict()) for i, w in self.workers.items()}
        return out

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`__getstate__`; the process group becomes the default group."""
        self.process_group = None
        for n, v in state.items():
            if n != "workers":
                setattr(self, n, v)
        self.workers = {}
        for i, (numel, dtype, sd) in state["workers"].items():
            device = torch.as_tensor(sd["memory"]["error"]).device
            w = SparseWorker(self.make_compressor(), numel, None, dtype, device)
            w.load_state_dict(sd)
            self.workers[int(i)] = w

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(density={self.density}, start_iter={self.start_iter}, "
                f"iter={self.iter})")


class TopKState(_SparseState):
    """State of :func:`topk_hook`: Top-k with error feedback, per bucket."""

    __slots__ = ()

    def make_compressor(self) -> Compressor:
        return TopK(self.density)


class RegTopKState(_SparseState):
    """State of :func:`regtopk_hook`: RegTop-k (regularisation ``mu`` > 0) with error feedback."""

    __slots__ = (
        # --- RegTop-k's regularisation (mu -> 0 is Top-k)
        "mu",
    )

    def __init__(self, process_group: Any = None, density: float = 0.01, start_iter: int = MIN_START_ITER,
                 mu: float = 4.0) -> None:
        ok = isinstance(mu, numbers.Real) and not isinstance(mu, bool) and float(mu) > 0
        if not ok:
            raise UserError(f"mu must be a number > 0, got {mu!r}")
        self.mu = float(mu)
        super().__init__(process_group, density, start_iter)

    def make_compressor(self) -> Compressor:
        return RegTopK(self.density, mu=self.mu)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", mu={self.mu})"


# ---------------------------------------------------------------------------------------- the hooks
def _group(state: _SparseState) -> Any:
    return state.process_group if state.process_group is not None else dist.group.WORLD


def _allreduce_mean(buffer: torch.Tensor, group: Any, state: _SparseState) -> Future:
    buffer.div_(dist.get_world_size(group))
    state.bytes_sent += buffer.numel() * buffer.element_size()
    fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _unpack(gathered: torch.Tensor, world: int, k: int, index_dtype: torch.dtype,
            dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (indices, values) from the gathered messages, concatenated in rank order."""
    parts = [unpack_tensor(row, k, 0, index_dtype, dtype, dtype) for row in gathered.view(world, -1)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _sparse_hook(state: _SparseState, bucket: dist.GradBucket) -> Future:
    group = _group(state)
    buffer = bucket.buffer()
    if not state.compressing:
        fut = _allreduce_mean(buffer, group, state)
        state.maybe_increase_iter(bucket)
        return fut
    world = dist.get_world_size(group)
    # under a half-precision wrapper the values travel in its dtype; selection and memory stay float32
    wide = buffer if buffer.dtype in (torch.float32, torch.float64) else buffer.float()
    layout = tuple(tuple(p.shape) for p in bucket.parameters())
    worker = state.worker(int(bucket.index()), wide, layout)
    if worker is None:
        fut = _allreduce_mean(buffer, group, state)
        state.maybe_increase_iter(bucket)
        return fut
    indices, values = worker.compress(wide)
    k, numel = indices.numel(), buffer.numel()
    index_dtype = wire.wire_type(wire.index_dtype(numel)).torch      # int32 for any real bucket
    message = pack_tensor(indices, values.to(buffer.dtype), None, index_dtype)
    gathered = torch.empty(world * message.numel(), dtype=torch.uint8, device=message.device)
    state.bytes_sent += message.numel()
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newer name first
    fut = gather(gathered, message, group=group, async_op=True).get_future()
    state.maybe_increase_iter(bucket)

    def finish(_: Any) -> torch.Tensor:
        idx, val = _unpack(gathered, world, k, index_dtype, buffer.dtype)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise RuntimeError(f"sparse index out of range 0..{numel - 1} in bucket {bucket.index()}")
        scatter_sum_([wide], idx, val.to(wide.dtype))
        wide.div_(world)
        worker.observe(wide, world)
        if wide is not buffer:
            buffer.copy_(wide)
        return buffer

    return fut.then(finish)


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> Future:
    """DDP communication hook: Top-k with error feedback (see the module docstring)."""
    if not isinstance(state, TopKState):
        raise UserError(f"topk_hook needs a hpc_dgrab.ddp.TopKState, got {type(state).__name__}")
    return _sparse_hook(state, bucket)


def regtopk_hook(state: RegTopKState, bucket: dist.GradBucket) -> Future:
    """DDP communication hook: RegTop-k with error feedback (see the module docstring)."""
    if not isinstance(state, RegTopKState):
        raise UserError(f"regtopk_hook needs a hpc_dgrab.ddp.RegTopKState, got {type(state).__name__}")
    return _sparse_hook(state, bucket)


def register(model: Any, state: _SparseState, hook: Optional[Hook] = None) -> None:
    """``model.register_comm_hook(state, hook)`` (``hook`` default: the state's own), refusing a
    second communication hook on one model with a one-line UserError."""
    if not isinstance(state, _SparseState):
        raise UserError(f"state must be a TopKState or RegTopKState, got {type(state).__name__}")
    if hook is None:
        hook = regtopk_hook if isinstance(state, RegTopKState) else topk_hook
    wants = {topk_hook: TopKState, regtopk_hook: RegTopKState}.get(hook)
    if wants is not None and not isinstance(state, wants):
        raise UserError(f"{hook.__name__} needs a hpc_dgrab.ddp.{wants.__name__}, got {type(state).__name__}")
    existing = getattr(model, "_comm_hooks", None)
    if existing:
        name = getattr(existing[0][0], "__qualname__", existing[0][0])
        raise UserError(f"this DDP model already has a communication hook ({name}); DDP takes one per model")
    try:
        model.register_comm_hook(state, hook)
    except RuntimeError as exc:
        if "only be called once" not in str(exc):
            raise
        raise UserError("this DDP model already has a communication hook; DDP takes one per model") from None
