"""The three GRACE roles of gradient sparsification, plus the exchanger the trainer calls.

* :class:`Compressor` decides what to send: ``compress(tensor, state) -> (indices, values, ctx)``
  on one flat segment, and ``observe(state, indices, values, aggregate, num_workers)`` afterwards so
  that a method with memory of the last round (RegTop-k) can update its per-worker ``state`` dict.
  A compressor object holds only its parameters; everything that changes lives in ``state``.
* :class:`ErrorFeedback` (the Memory) keeps what was not sent: ``a = grad + e``, then ``e = a - v``.
* A communicator (:class:`LocalCommunicator` for one process without MPI, :class:`MPICommunicator`)
  moves the selections: a sparse all-gather of ``(indices, values[, extra])`` summed into a dense
  vector, or a dense all-reduce for the ``none`` method.

:class:`SparseWorker` is one worker's compressor + memory + state (pure numerics, no MPI).
:class:`CompressedExchanger` composes one or more local workers with a communicator and implements
the synchronous driver's contract ``exchange(grad, extra) -> (mean_grad, extra_sum)``,
``bytes_sent``, ``state_dict()`` / ``load_state_dict()``. Several local workers per rank are
*virtual workers* (a simulation of N workers on fewer processes); the objects are the same.
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

State = Dict[str, torch.Tensor]

#: dense length below which indices travel as int32 (the comm layer's rule)
INT32_LIMIT = 2 ** 31 - 1
#: an extra longer than this is summed by an all-reduce of its own (MPICommunicator.sparse_sum)
EXTRA_ALLREDUCE_BYTES = 1 << 20


def k_for(numel: int, density: Optional[float] = None, k: Optional[int] = None) -> int:
    """Number of entries to keep of a segment of ``numel``: ``k`` if given, else round(density*numel).

    Always at least 1 and at most ``numel``.
    """
    if k is None:
        if density is None:
            raise ValueError("give density or k")
        k = int(round(float(density) * numel))
    return max(1, min(int(numel), int(k)))


#: from this many entries on, :func:`topk_indices` selects through a sampled threshold
THRESHOLD_TOPK_MIN = 1 << 18
#: at most this many entries per piece when a :class:`ScoreVector` is scanned (its workspace)
SCORE_PIECE = 1 << 18


def score_piece(numel: int) -> int:
    """Entries per piece for a vector of ``numel``: about a sixteenth of it, 2**15 to ``SCORE_PIECE``
    (a workspace small next to the vector, a Python loop of at most ~40 pieces at 1e7)."""
    return max(1, min(int(numel), max(1 << 15, min(SCORE_PIECE, int(numel) // 16))))


class ScoreVector:
    """A 1-D score vector that :func:`topk_indices` reads without it ever being in memory whole:
    ``at(positions)`` (the scores there) and ``piece(start, stop, out)`` (scores[start:stop], written
    into ``out``, a workspace of at least ``stop - start`` entries). ``full()`` builds the whole vector
    (for short vectors and the rare fall-back). Subclasses must give bit-for-bit the same numbers
    from all three (element-wise formulas), so that the selection does not depend on the path."""

    def __init__(self, numel: int, dtype: torch.dtype, device: Any) -> None:
        self.numel, self.dtype, self.device = int(numel), dtype, device

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def piece(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def full(self) -> torch.Tensor:
        return self.piece(0, self.numel, torch.empty(self.numel, dtype=self.dtype, device=self.device))


class _Dense(ScoreVector):
    """A score tensor that already exists (read in one piece, as it is)."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__(scores.numel(), scores.dtype, scores.device)
        self.scores = scores

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.scores[positions]

    def piece(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return self.scores[start:stop]

    def full(self) -> torch.Tensor:
        return self.scores


class AbsScores(ScoreVector):
    """``|a|`` (Top-k's score), computed a piece at a time."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__(a.numel(), a.dtype, a.device)
        self.a = a.reshape(-1)

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.a[positions].abs_()

    def piece(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return torch.abs(self.a[start:stop], out=out[:stop - start])


def topk_indices(scores: "torch.Tensor | ScoreVector", k: int,
                 workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices of the ``k`` largest entries of a 1-D ``scores`` (unsorted order; the same set as
    ``torch.topk`` up to the order of ties). ``scores`` may be a :class:`ScoreVector`: it is then
    read in pieces of ``workspace``'s length (default :func:`score_piece`), never whole
    (except in the fall-back below and for vectors shorter than ``THRESHOLD_TOPK_MIN``).

    Large vectors (``THRESHOLD_TOPK_MIN`` entries and k at most an eighth of them) go through a
    threshold: the k-th largest of the whole vector is estimated from a fixed pseudo-random sample,
    set a little low, so that the entries at or above it are k or a few more; ``torch.topk`` then runs
    on those candidates only. On one CPU core this is about 9x faster than ``torch.topk`` on 1e7
    entries at 1 % (one compare-and-gather pass instead of a selection over the whole vector). When
    the sample misleads and fewer than k entries pass, it falls back to ``torch.topk`` on everything,
    so the answer is exact either way.
    """
    if isinstance(scores, torch.Tensor):
        scores = _Dense(scores)
    n = scores.numel
    if k >= n:
        return torch.arange(n, device=scores.device)
    if n >= THRESHOLD_TOPK_MIN and 8 * k <= n:
        idx = _topk_by_threshold(scores, k, workspace)
        if idx is not None:
            return idx
    return torch.topk(scores.full(), k, sorted=False).indices


def _topk_by_threshold(scores: "torch.Tensor | ScoreVector", k: int,
                       workspace: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The k largest through a sampled threshold, or None when fewer than k entries pass it."""
    if isinstance(scores, torch.Tensor):
        scores = _Dense(scores)
    n = scores.numel
    m = min(n // 4, max(4096, 256 * n // k))    # about 256 sampled entries above the k-th largest
    g = torch.Generator(device=scores.device).manual_seed(0)
    sample = scores.at(torch.randint(0, n, (m,), generator=g, device=scores.device))
    above = k * m / n                            # expected sampled entries above the k-th largest
    j = min(m, int(math.ceil(above + 4 * math.sqrt(above))) + 1)   # 4 sigma low: k pass, w.h.p.
    threshold = torch.topk(sample, j, sorted=False).values.min()
    # numpy's scan is several times faster than torch.nonzero on one CPU core
    use_numpy = torch.device(scores.device).type == "cpu" \
        and scores.dtype in (torch.float16, torch.float32, torch.float64)
    if isinstance(scores, _Dense):
        step = n
    elif workspace is not None and workspace.dtype == scores.dtype and workspace.numel() > 0:
        step = workspace.numel()
    else:
        step = score_piece(n)
        workspace = torch.empty(step, dtype=scores.dtype, device=scores.device)
    found, found_scores = [], []
    for start in range(0, n, step):
        stop = min(n, start + step)
        part = scores.piece(start, stop, workspace)
        if use_numpy:
            local = torch.from_numpy(np.flatnonzero(part.detach().numpy() >= threshold.item()))
        else:
            local = torch.nonzero(part >= threshold).squeeze(1)
        found.append(local + start if start else local)
        found_scores.append(part[local])
    candidates = torch.cat(found) if len(found) > 1 else found[0]
    if candidates.numel() < k:
        return None
    cand_scores = torch.cat(found_scores) if len(found_scores) > 1 else found_scores[0]
    return candidates[torch.topk(cand_scores, k, sorted=False).indices]


class Compressor(ABC):
    """What to send. Subclasses: one file per method (none, topk, regtopk)."""

    name: str = "base"
    #: True when the method sends the whole vector (dense all-reduce instead of a sparse gather)
    dense: bool = False

    def __init__(self, density: Optional[float] = None, k: Optional[int] = None) -> None:
        if density is not None and not 0 < float(density) <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if k is not None and int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if density is None and k is None and not self.dense:
            raise ValueError(f"{self.name}: give density or k")
        self.density, self.k = density, k

    def k_for(self, numel: int) -> int:
        """Entries this compressor keeps of a segment of ``numel`` entries."""
        return numel if self.dense else k_for(numel, self.density, self.k)

    @abstractmethod
    def compress(self, tensor: torch.Tensor, state: State,
                 workspace: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        """Select from a 1-D ``tensor``: (int64 indices, values = tensor[indices], ctx).

        ``workspace``: optional 1-D tensor of ``tensor``'s dtype (overwritten; see
        :func:`score_piece` for its length), through which the scores of a long tensor are scanned
        a piece at a time:
        no score vector of the tensor's size is ever allocated (on CPU a fresh one also costs page
        faults worth several passes over it)."""

    def observe(self, state: State, indices: torch.Tensor, values: torch.Tensor,
                aggregate: torch.Tensor, num_workers: int) -> None:
        """After the exchange: update ``state`` from this worker's selection and the mean ``aggregate``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(density={self.density}, k={self.k})"


class FlatParts:
    """A flat vector held as consecutive 1-D-viewable tensors (e.g. each parameter's own gradient),
    never concatenated: what the exchanger needs of a flat vector (``numel``, ``zero_``,
    ``index_add_`` along dim 0, ``div_``, gathering at indices, adding into a flat tensor).
    ``index_add_`` hands each part its entries in their original order, so duplicate indices add
    up in the same order as on one flat tensor (the same bits)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("FlatParts needs at least one tensor")
        self.parts = [t.view(-1) for t in tensors]
        self.dtype, self.device = self.parts[0].dtype, self.parts[0].device
        sizes = [t.numel() for t in self.parts]
        self.offsets = [int(o) for o in np.concatenate([[0], np.cumsum(sizes)[:-1]])]
        self._numel = int(sum(sizes))
        self._starts = torch.tensor(self.offsets, dtype=torch.int64, device=self.device)

    def numel(self) -> int:
        return self._numel

    def dim(self) -> int:
        return 1

    def detach(self) -> "FlatParts":
        return self

    def reshape(self, *shape: Any) -> "FlatParts":
        if tuple(shape) not in ((-1,), ((-1,),), (self._numel,)):
            raise ValueError(f"FlatParts is flat; cannot reshape to {shape}")
        return self

    def zero_(self) -> "FlatParts":
        for t in self.parts:
            t.zero_()
        return self

    def div_(self, value: float) -> "FlatParts":
        for t in self.parts:
            t.div_(value)
        return self

    def _split(self, index: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """(a stable order grouping ``index`` by part, the group boundaries)."""
        part = torch.searchsorted(self._starts, index, right=True) - 1
        order = torch.argsort(part, stable=True)
        counts = torch.bincount(part, minlength=len(self.parts)).tolist()
        return order, [int(c) for c in np.concatenate([[0], np.cumsum(counts)])]

    def index_add_(self, dim: int, index: torch.Tensor, source: torch.Tensor) -> "FlatParts":
        if dim != 0:
            raise ValueError("FlatParts.index_add_ is along dim 0")
        order, bounds = self._split(index)
        index, source = index[order], source[order]
        for t, off, lo, hi in zip(self.parts, self.offsets, bounds[:-1], bounds[1:]):
            if hi > lo:
                t.index_add_(0, index[lo:hi] - off, source[lo:hi])
        return self

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            if index.indices(self._numel) != (0, self._numel, 1):
                raise ValueError("FlatParts can only be sliced whole")
            return self
        order, bounds = self._split(index)
        out = torch.empty(index.numel(), dtype=self.dtype, device=self.device)
        for t, off, lo, hi in zip(self.parts, self.offsets, bounds[:-1], bounds[1:]):
            if hi > lo:
                out[order[lo:hi]] = t[index[order[lo:hi]] - off]
        return out

    def add_to_(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat += self`` (``flat`` 1-D of the same length), part by part."""
        for t, off in zip(self.parts, self.offsets):
            flat[off:off + t.numel()].add_(t)
        return flat


class ErrorFeedback:
    """Error-feedback memory of one worker: ``compensate`` returns ``a = grad + e``; ``update`` keeps
    ``e = a - v`` where ``v`` is ``a`` on the sent indices and 0 elsewhere (so ``a == v + e`` exactly)."""

    def __init__(self, numel: int, dtype: torch.dtype = torch.float32, device: Any = "cpu") -> None:
        self.error = torch.zeros(int(numel), dtype=dtype, device=device)

    def compensate(self, grad: torch.Tensor) -> torch.Tensor:
        """The error-compensated gradient ``grad + e`` (a new tensor)."""
        if grad.numel() != self.error.numel():
            raise ValueError(f"gradient has {grad.numel()} entries, memory {self.error.numel()}")
        if self.error.dtype != grad.dtype or self.error.device != grad.device:
            self.error = self.error.to(dtype=grad.dtype, device=grad.device)
        return grad.reshape(-1) + self.error

    def compensate_(self, grad: torch.Tensor) -> torch.Tensor:
        """:meth:`compensate` in place: the memory becomes ``grad + e`` and is returned (no
        allocation); :meth:`update` must follow before the memory is read again."""
        if grad.numel() != self.error.numel():
            raise ValueError(f"gradient has {grad.numel()} entries, memory {self.error.numel()}")
        if self.error.dtype != grad.dtype or self.error.device != grad.device:
            self.error = self.error.to(dtype=grad.dtype, device=grad.device)
        if isinstance(grad, FlatParts):
            return grad.add_to_(self.error)
        return self.error.add_(grad.reshape(-1))

    def update(self, compensated: torch.Tensor, indices: torch.Tensor) -> None:
        """Remember everything of ``compensated`` except the sent ``indices``.

        Takes ownership of ``compensated`` (zeroes the sent entries in place, no copy); the values
        sent must have been gathered from it before (``compensated[indices]`` is a copy).
        """
        self.error = compensated.detach().index_fill_(0, indices, 0)

    def state_dict(self) -> State:
        """The memory ``e`` (a copy)."""
        return {"error": self.error.clone()}

    def load_state_dict(self, state: State) -> None:
        """Restore ``e`` from :meth:`state_dict`."""
        error = torch.as_tensor(state["error"])
        if error.numel() != self.error.numel():
            raise ValueError(f"memory state has {error.numel()} entries, expected {self.error.numel()}")
        self.error = error.clone().to(device=self.error.device)


def segments_of(sizes: Optional[Sequence[int]], numel: int) -> List[Tuple[int, int]]:
    """(offset, length) of each segment: one segment (the flattened vector) when ``sizes`` is None."""
    if sizes is None:
        return [(0, int(numel))]
    sizes = [int(s) for s in sizes]
    if any(s <= 0 for s in sizes) or sum(sizes) != numel:
        raise ValueError(f"segment sizes must be positive and sum to {numel}, got {sum(sizes)}")
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    return list(zip((int(o) for o in offsets), sizes))


class SparseWorker:
    """One worker's side of compressed SGD: memory, compressor and its state (no MPI).

    ``compress(grad) -> (indices, values)`` into the flat vector; after the exchange
    ``observe(mean, num_workers)``. ``segment_sizes`` selects per tensor (k per segment, one state
    per segment; indices are still positions in the flat vector); None = one flattened vector.
    """

    def __init__(self, compressor: Compressor, numel: int, segment_sizes: Optional[Sequence[int]] = None,
                 dtype: torch.dtype = torch.float32, device: Any = "cpu") -> None:
        self.compressor = compressor
        self.numel = int(numel)
        self.segments = segments_of(segment_sizes, self.numel)
        self.memory = ErrorFeedback(self.numel, dtype, device)
        self.states: List[State] = [{} for _ in self.segments]
        self._last: Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]] = None
        self._workspace: Optional[torch.Tensor] = None   # the compressor's score workspace, reused

    @property
    def k(self) -> int:
        """Entries sent per round (sum over segments)."""
        return sum(self.compressor.k_for(n) for _, n in self.segments)

    def compress(self, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Error-compensate ``grad``, select per segment, update the memory; (indices, values)."""
        a = self.memory.compensate_(grad.detach())
        ws = self._workspace
        if ws is None or ws.dtype != a.dtype or ws.device != a.device:
            ws = self._workspace = torch.empty(score_piece(a.numel()), dtype=a.dtype, device=a.device)
        idx_parts, val_parts = [], []
        for (off, n), state in zip(self.segments, self.states):
            i, v, _ = self.compressor.compress(a[off:off + n], state, ws)
            idx_parts.append(i)
            val_parts.append(v)
        self._last = (idx_parts, val_parts)
        indices = torch.cat([i + off for i, (off, _) in zip(idx_parts, self.segments)])
        values = torch.cat(val_parts)
        self.memory.update(a, indices)
        return indices, values

    def observe(self, mean: torch.Tensor, num_workers: int) -> None:
        """Hand the round's mean aggregate (flat, dense) to the compressor's per-segment state."""
        if self._last is None:
            raise RuntimeError("observe() before compress()")
        for (off, n), state, i, v in zip(self.segments, self.states, *self._last):
            self.compressor.observe(state, i, v, mean[off:off + n], num_workers)
        self._last = None

    def buffer_bytes(self) -> int:
        """Bytes held between rounds: error memory, score workspace, compressor state."""
        tensors = [self.memory.error, self._workspace] + [t for s in self.states for t in s.values()]
        return sum(t.nbytes for t in tensors if t is not None)

    def state_dict(self) -> Dict[str, Any]:
        """Memory and per-segment compressor state (copies)."""
        return {"memory": self.memory.state_dict(),
                "segments": [{k: t.clone() for k, t in s.items()} for s in self.states]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same segment layout)."""
        if len(state["segments"]) != len(self.segments):
            raise ValueError(f"state has {len(state['segments'])} segments, expected {len(self.segments)}")
        self.memory.load_state_dict(state["memory"])
        self.states = [{k: torch.as_tensor(t).clone() for k, t in s.items()} for s in state["segments"]]
        self._last = None


# ---------------------------------------------------------------------------------------------
# Communicators: how the selections travel. The numerics above never import MPI.


def message_bytes(k: int, numel: int, value_dtype: torch.dtype, extra_numel: int = 0,
                  extra_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of one rank's sparse message: k indices (int32 when numel < 2**31) + k values + extra."""
    index_size = 4 if numel <= INT32_LIMIT else 8
    value_size = torch.empty(0, dtype=value_dtype).element_size()
    extra_size = torch.empty(0, dtype=extra_dtype or value_dtype).element_size()
    return k * (index_size + value_size) + extra_numel * extra_size


class LocalCommunicator:
    """One process, no MPI: the "gather" is this rank's own message (what a 1-rank job does)."""

    size = 1
    rank = 0

    def allreduce_sum(self, buf: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """(sum over ranks, bytes handed to the network)."""
        return buf, buf.numel() * buf.element_size()

    def sparse_sum(self, indices: torch.Tensor, values: torch.Tensor, extra: Optional[torch.Tensor],
                   numel: int, same_sizes: bool = False, out: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
        """(dense sum of every rank's sparse vector, sum of extras, bytes this rank sent); the dense
        sum is written into ``out`` (1-D, ``numel``) when given."""
        if out is None:
            dense = torch.zeros(numel, dtype=values.dtype, device=values.device)
        else:
            dense = out.zero_()
        dense.index_add_(0, indices, values.to(dense.dtype))
        nbytes = message_bytes(indices.numel(), numel, values.dtype,
                               0 if extra is None else extra.numel(), None if extra is None else extra.dtype)
        return dense, (None if extra is None else extra.clone()), nbytes


class MPICommunicator:
    """Sparse all-gather / dense all-reduce over an MPI communicator (default: the world).

    The sparse path sends ONE message per rank, ``[indices | values | extra]``, through
    ``hpc_dgrab.comm.sparse.sparse_allgather`` (Allgather when all ranks send equal sizes,
    Allgatherv otherwise) and sums the pieces into a dense vector; a long extra (D-GraB's order
    data) goes by an all-reduce of its own instead (see :meth:`sparse_sum`).
    """

    def __init__(self, comm: Optional[Any] = None) -> None:
        if comm is None:
            from hpc_dgrab import runtime

            comm = runtime.world()
        self.comm = comm
        self.size, self.rank = comm.size, comm.rank
        self._backend: Any = None

    def allreduce_sum(self, buf: torch.Tensor) -> Tuple[torch.Tensor, int]:
        from hpc_dgrab.comm import collectives

        buf = buf.contiguous()
        collectives.allreduce_(buf, comm=self.comm)
        return buf, buf.numel() * buf.element_size()

    def sparse_sum(self, indices: torch.Tensor, values: torch.Tensor, extra: Optional[torch.Tensor],
                   numel: int, same_sizes: bool = False, out: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
        """(dense sum of every rank's sparse vector, sum of extras, bytes this rank sent). An extra
        of more than ``EXTRA_ALLREDUCE_BYTES`` (every rank's extra has the same length) is summed
        IN PLACE by an all-reduce of its own, in pieces, instead of riding in the gather, where
        every rank would receive and copy n of them (n times the extra's memory)."""
        from hpc_dgrab.comm.sparse import sparse_allgather

        long_extra = extra is not None and extra.numel() * extra.element_size() > EXTRA_ALLREDUCE_BYTES
        g = sparse_allgather(indices, values, None if long_extra else extra, numel=numel,
                             same_sizes=same_sizes, comm=self.comm)
        dense = g.to_dense(numel, out=out)
        nbytes = int(g.bytes_sent)
        extra_sum = None
        if long_extra:
            extra_sum = extra.reshape(-1)
            if not extra_sum.is_contiguous():
                raise ValueError("a long extra must be contiguous (it is summed in place)")
            if self._backend is None:
                from hpc_dgrab.comm.collectives import get_backend

                self._backend = get_backend("mpi", self.comm)
            step = max(1, EXTRA_ALLREDUCE_BYTES // extra_sum.element_size())
            for piece in extra_sum.split(step):
                self._backend.allreduce_(piece)
            nbytes += extra_sum.numel() * extra_sum.element_size()
        elif extra is not None:   # summed in rank order into one buffer (no stacked n x e copy)
            extra_sum = g.extras[0].to(extra.dtype, copy=True)
            for e in g.extras[1:]:
                extra_sum.add_(e.to(extra.dtype))
        return dense, extra_sum, nbytes


def worker_range(num_workers: int, rank: int, size: int) -> range:
    """The virtual workers rank ``rank`` of ``size`` hosts: a contiguous block (sizes differ by <= 1)."""
    if num_workers < size:
        raise ValueError(f"{num_workers} workers cannot be spread over {size} ranks (need workers >= ranks)")
    return range(rank * num_workers // size, (rank + 1) * num_workers // size)


class CompressedExchanger:
    """Synchronous gradient exchange with compression and error feedback (any method, 1..N ranks).

    ``compressor``: what every local worker sends; ``num_workers``: the global number of workers N
    (the mean divides by it); ``communicator``: :class:`LocalCommunicator` or :class:`MPICommunicator`;
    ``local_workers``: workers on this rank (1 in training; several for virtual workers).
    ``numel`` (and ``dtype``/``device``) may be left None: the workers are then created at the first
    exchange (or by ``load_state_dict``) with the gradient's size, type and device.
    ``segment_sizes``: compress per tensor instead of on the flattened vector.

    ``exchange(grad, extra)`` (one local worker) and ``exchange_many(grads, extras)`` return
    ``(mean gradient, sum of extras over all workers)``; ``extra`` travels in the same message.
    ``bytes_sent`` counts the payload this rank handed to the network (cumulative).
    """

    def __init__(self, compressor: Compressor, num_workers: int, communicator: Any, local_workers: int = 1,
                 numel: Optional[int] = None, segment_sizes: Optional[Sequence[int]] = None,
                 dtype: Optional[torch.dtype] = None, device: Any = None) -> None:
        if local_workers < 1:
            raise ValueError("need at least one local worker")
        if num_workers < local_workers:
            raise ValueError(f"{local_workers} local workers but only {num_workers} in total")
        self.compressor = compressor
        self.num_workers = int(num_workers)
        self.communicator = communicator
        self.local_workers = int(local_workers)
        self.segment_sizes = None if segment_sizes is None else [int(x) for x in segment_sizes]
        self.workers: List[SparseWorker] = []
        self.numel: Optional[int] = None
        self.bytes_sent = 0
        self.rounds = 0
        # every rank sends the same k only if it hosts the same number of workers
        self._same_sizes = self.num_workers % communicator.size == 0
        if numel is not None:
            self._build(int(numel), dtype or torch.float32, device or "cpu")

    def _build(self, numel: int, dtype: torch.dtype, device: Any) -> None:
        self.numel = numel
        self.workers = [SparseWorker(self.compressor, numel, self.segment_sizes, dtype, device)
                        for _ in range(self.local_workers)]

    def exchange(self, grad: torch.Tensor, extra: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One worker per rank: (mean of all workers' sent vectors, sum of extras). ``out`` (may be
        ``grad`` itself, which is read first) receives the mean of a sparse method (no allocation)."""
        if self.local_workers != 1:
            raise ValueError(f"exchange() is for one local worker; this rank has {self.local_workers}")
        mean, extra_sum = self.exchange_many([grad], None if extra is None else [extra], out=out)
        return (mean if isinstance(mean, FlatParts) else mean.view_as(grad)), extra_sum

    def exchange_parts(self, grad: FlatParts, extra: Optional[torch.Tensor] = None
                       ) -> Tuple[FlatParts, Optional[torch.Tensor]]:
        """:meth:`exchange` of a gradient held as :class:`FlatParts` (each parameter's own tensor,
        never concatenated into a flat copy), for a sparse method with one flat segment: the mean
        is written back into the parts; returns (the parts, sum of extras)."""
        if self.compressor.dense or self.segment_sizes is not None:
            raise ValueError("exchange_parts() is for a sparse method on one flat segment")
        return self.exchange(grad, extra, out=grad)  # type: ignore[arg-type]

    def exchange_many(self, grads: Sequence[torch.Tensor], extras: Optional[Sequence[torch.Tensor]] = None,
                      out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Every local worker's gradient -> (flat mean over all N workers, summed extras); a sparse
        method writes the mean into ``out`` (1-D, contiguous) when given."""
        if not self.workers and grads:
            self._build(grads[0].numel(), grads[0].dtype, grads[0].device)
        if len(grads) != len(self.workers):
            raise ValueError(f"{len(grads)} gradients for {len(self.workers)} local workers")
        extra = None
        if extras is not None:
            extra = extras[0].detach().reshape(-1).clone()
            for e in extras[1:]:
                extra += e.detach().reshape(-1)
        if self.compressor.dense:
            mean, extra_sum = self._dense(grads, extra)
        else:
            parts = [w.compress(g) for w, g in zip(self.workers, grads)]
            indices = torch.cat([p[0] for p in parts])
            values = torch.cat([p[1] for p in parts])
            total, extra_sum, nbytes = self.communicator.sparse_sum(
                indices, values, extra, self.numel, same_sizes=self._same_sizes,
                out=None if out is None else out.reshape(-1))
            self.bytes_sent += nbytes
            mean = total.div_(self.num_workers)
            for w in self.workers:
                w.observe(mean, self.num_workers)
        self.rounds += 1
        return mean, extra_sum

    def _dense(self, grads: Sequence[torch.Tensor], extra: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        local = grads[0].detach().reshape(-1).clone()
        for g in grads[1:]:
            local += g.detach().reshape(-1)
        d = local.numel()
        buf = local if extra is None else torch.cat([local, extra.to(local.dtype)])
        buf, nbytes = self.communicator.allreduce_sum(buf)
        self.bytes_sent += nbytes
        extra_sum = None if extra is None else buf[d:].to(extra.dtype)
        return buf[:d].div_(self.num_workers), extra_sum

    def buffer_bytes(self) -> int:
        """Bytes the local workers hold between rounds (error memory, workspaces, compressor state)."""
        return sum(w.buffer_bytes() for w in self.workers)

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs to continue identically (per rank)."""
        return {"method": self.compressor.name, "num_workers": self.num_workers,
                "bytes_sent": self.bytes_sent, "rounds": self.rounds,
                "workers": [w.state_dict() for w in self.workers]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; creates the workers if no gradient was seen yet."""
        if state.get("method", self.compressor.name) != self.compressor.name:
            raise ValueError(f"checkpoint was written with --compress {state['method']}, "
                             f"this run uses {self.compressor.name}")
        if len(state["workers"]) != self.local_workers:
            raise ValueError(f"checkpoint has {len(state['workers'])} local workers, "
                             f"expected {self.local_workers}")
        error = torch.as_tensor(state["workers"][0]["memory"]["error"])
        if not self.workers:
            self._build(error.numel(), error.dtype, error.device)
        for w, s in zip(self.workers, state["workers"]):
            w.load_state_dict(s)
        self.bytes_sent = int(state.get("bytes_sent", 0))
        self.rounds = int(state.get("rounds", 0))


def density_label(density: float) -> str:
    """``0.001`` -> ``"0.1%"`` (for tables)."""
    pct = density * 100
    return f"{pct:g}%" if not math.isclose(pct, round(pct)) else f"{int(round(pct))}%"

