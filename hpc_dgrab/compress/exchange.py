"""The gradient exchange: one worker per rank averages its gradient with every other rank's.

* :class:`SparseWorker` is one worker's compressor + error-feedback memory + per-segment state
  (pure numerics, no MPI): ``compress(grad) -> (indices, values)``, then ``observe(mean, n)``.
* :class:`GradientExchange` moves gradients through a
  :class:`~hpc_dgrab.comm.transport.Collectives` transport. ``compression=None``: dense sums
  (``start(message) -> Handle`` for callers that overlap buckets with backward, ``sum_``,
  ``mean_``); otherwise ``mean_`` is one sparse all-gather of this rank's error-compensated
  selection. ``mean_(grads, extra)`` overwrites ``grads`` (one tensor, or consecutive pieces of the
  flat gradient such as each parameter's ``.grad``, never concatenated on the sparse path) with the
  mean over ranks and returns the sum over ranks of ``extra``, which travels in the same message.

``bytes_sent`` counts the payload this rank handed to the transport; ``state_dict()`` holds the
compression state in the layout ``{"method", "num_workers", "bytes_sent", "rounds", "workers":
[worker state]}`` (one worker).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from hpc_dgrab.comm.transport import Collectives, Handle
from hpc_dgrab.compress.base import Compressor, State
from hpc_dgrab.compress.memory import ErrorFeedback, Pieces, pieces_of
from hpc_dgrab.compress.selection import score_piece

log = logging.getLogger(__name__)

#: an extra longer than this is summed by an all-reduce of its own, in place, in pieces of this
#: size (in the gather every rank would receive and copy every rank's copy of it)
EXTRA_ALLREDUCE_BYTES = 1 << 20


def segments_of(sizes: Optional[Sequence[int]], numel: int) -> List[Tuple[int, int]]:
    """(offset, length) of each segment: one segment (the flattened vector) when ``sizes`` is None."""
    if sizes is None:
        return [(0, int(numel))]
    sizes = [int(s) for s in sizes]
    if any(s <= 0 for s in sizes) or sum(sizes) != numel:
        raise ValueError(f"segment sizes must be positive and sum to {numel}, got {sum(sizes)}")
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    return list(zip((int(o) for o in offsets), sizes))


def _split(parts: List[torch.Tensor], index: torch.Tensor) -> Tuple[torch.Tensor, List[int], List[int]]:
    """(a stable order grouping ``index`` by piece, the group bounds, each piece's offset)."""
    offsets = np.concatenate([[0], np.cumsum([t.numel() for t in parts])[:-1]]).astype(np.int64)
    starts = torch.from_numpy(offsets).to(index.device)
    piece = torch.searchsorted(starts, index, right=True) - 1
    order = torch.argsort(piece, stable=True)
    counts = torch.bincount(piece, minlength=len(parts)).tolist()
    return order, [int(c) for c in np.concatenate([[0], np.cumsum(counts)])], offsets.tolist()


def gather(parts: List[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """The flat vector held as ``parts`` (1-D pieces) at positions ``index`` (a new tensor)."""
    if len(parts) == 1:
        return parts[0][index]
    order, bounds, offsets = _split(parts, index)
    out = torch.empty(index.numel(), dtype=parts[0].dtype, device=parts[0].device)
    for t, off, lo, hi in zip(parts, offsets, bounds[:-1], bounds[1:]):
        if hi > lo:
            out[order[lo:hi]] = t[index[order[lo:hi]] - off]
    return out


def scatter_sum_(parts: List[torch.Tensor], index: torch.Tensor, values: torch.Tensor) -> None:
    """Overwrite the flat vector held as ``parts`` with the dense sum of ``(index, values)``
    (duplicates add up in their order, as ``index_add_`` on one flat tensor: the same bits)."""
    for t in parts:
        t.zero_()
    if len(parts) == 1:
        parts[0].index_add_(0, index, values)
        return
    order, bounds, offsets = _split(parts, index)
    index, values = index[order], values[order]
    for t, off, lo, hi in zip(parts, offsets, bounds[:-1], bounds[1:]):
        if hi > lo:
            t.index_add_(0, index[lo:hi] - off, values[lo:hi])


class SparseWorker:
    """One worker's side of compressed SGD: memory, compressor and its state (no MPI).

    ``compress(grad) -> (indices, values)`` into the flat vector; after the exchange
    ``observe(mean, num_workers)``. ``grad`` and ``mean`` are one tensor or consecutive pieces of
    the flat vector. ``segment_sizes`` selects per tensor (k per segment, one state per segment;
    indices are still positions in the flat vector); None = one flattened vector.
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

    def compress(self, grad: Pieces) -> Tuple[torch.Tensor, torch.Tensor]:
        """Error-compensate ``grad``, select per segment, update the memory; (indices, values)."""
        a = self.memory.compensate_(grad)
        ws = self._workspace
        if ws is None or ws.dtype != a.dtype or ws.device != a.device:
            ws = self._workspace = torch.empty(score_piece(a.numel()), dtype=a.dtype, device=a.device)
        idx_parts, val_parts = [], []
        for (off, n), state in zip(self.segments, self.states):
            i, v = self.compressor.compress(a[off:off + n], state, ws)
            idx_parts.append(i)
            val_parts.append(v)
        self._last = (idx_parts, val_parts)
        indices = torch.cat([i + off for i, (off, _) in zip(idx_parts, self.segments)])
        values = torch.cat(val_parts)
        self.memory.update(a, indices)
        return indices, values

    def observe(self, mean: Pieces, num_workers: int) -> None:
        """Hand the round's mean over all workers (flat, dense; whole or in pieces) to the state."""
        if self._last is None:
            raise RuntimeError("observe() before compress()")
        parts = pieces_of(mean)
        for (off, _), state, i, v in zip(self.segments, self.states, *self._last):
            self.compressor.observe(state, i, v, gather(parts, i + off if off else i), num_workers)
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


def _sparse_allgather(transport: Collectives, indices: torch.Tensor, values: torch.Tensor,
                      extra: Optional[torch.Tensor], numel: int) -> Any:
    from hpc_dgrab.comm.sparse import sparse_allgather

    return sparse_allgather(indices, values, extra, numel=numel, same_sizes=True, transport=transport)


class GradientExchange:
    """Averages a gradient over the ranks of ``transport``; dense when ``compression`` is None.

    ``numel``/``dtype``/``device``/``segment_sizes`` size the compressed path's worker; left None,
    it is created by the first :meth:`mean_` (or by :meth:`load_state_dict`).
    """

    def __init__(self, transport: Collectives, compression: Optional[Compressor] = None,
                 numel: Optional[int] = None, dtype: Optional[torch.dtype] = None, device: Any = None,
                 segment_sizes: Optional[Sequence[int]] = None) -> None:
        self.transport = transport
        self.compression = compression
        self.size = int(transport.size)
        self.segment_sizes = None if segment_sizes is None else [int(s) for s in segment_sizes]
        self.worker: Optional[SparseWorker] = None
        self.bytes_sent = 0
        self.rounds = 0
        if compression is not None and numel:
            self._build(int(numel), dtype or torch.float32, device or "cpu")

    def _build(self, numel: int, dtype: torch.dtype, device: Any) -> SparseWorker:
        assert self.compression is not None
        self.worker = SparseWorker(self.compression, numel, self.segment_sizes, dtype, device)
        return self.worker

    # ---------------------------------------------------------------------------- dense sums
    def start(self, message: torch.Tensor) -> Handle:
        """Start an in-place sum of ``message`` over ranks (non-blocking)."""
        self.bytes_sent += message.numel() * message.element_size()
        return self.transport.allreduce_async_(message)

    def sum_(self, message: torch.Tensor) -> torch.Tensor:
        """Sum ``message`` over ranks in place (blocking, in the caller); returns it."""
        self.bytes_sent += message.numel() * message.element_size()
        return self.transport.allreduce_(message)

    def weighted_mean(self, vec: torch.Tensor, count: float) -> torch.Tensor:
        """``sum_i n_i v_i / sum_i n_i`` over ranks (``count`` = this rank's n_i) in one sum, the count
        riding in the message; a new tensor shaped like ``vec``. ValueError if every count is 0."""
        buf = torch.empty(vec.numel() + 1, dtype=vec.dtype, device=vec.device)
        torch.mul(vec.reshape(-1), count, out=buf[:-1])
        buf[-1] = count
        self.sum_(buf)
        total = float(buf[-1])
        if total <= 0:
            raise ValueError("weighted mean: the counts sum to zero on every rank")
        return buf[:-1].div_(total).view_as(vec)

    # ---------------------------------------------------------------------------- the mean
    def mean_(self, grads: Pieces, extra: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Overwrite ``grads`` with the mean over ranks; returns the sum of ``extra`` over ranks."""
        parts = pieces_of(grads)
        if self.compression is None:
            extra_sum = self._dense(parts, extra)
        else:
            extra_sum = self._sparse(parts, extra)
        self.rounds += 1
        return extra_sum

    def _dense(self, parts: List[torch.Tensor], extra: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        d = sum(t.numel() for t in parts)
        tail = [] if extra is None else [extra.detach().reshape(-1).to(parts[0].dtype)]
        buf = torch.cat(parts + tail)
        self.sum_(buf)
        mean = buf[:d].div_(self.size)
        off = 0
        for t in parts:
            t.copy_(mean[off:off + t.numel()])
            off += t.numel()
        return None if extra is None else buf[d:].to(extra.dtype)

    def _sparse(self, parts: List[torch.Tensor], extra: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        numel = sum(t.numel() for t in parts)
        worker = self.worker or self._build(numel, parts[0].dtype, parts[0].device)
        if numel != worker.numel:
            raise ValueError(f"gradient has {numel} entries, the exchange was built for {worker.numel}")
        indices, values = worker.compress(parts)
        long_extra = extra is not None and extra.numel() * extra.element_size() > EXTRA_ALLREDUCE_BYTES
        g = _sparse_allgather(self.transport, indices, values, None if long_extra else extra, numel)
        self.bytes_sent += int(g.bytes_sent)
        idx, val = g.concat()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise ValueError(f"sparse index out of range 0..{numel - 1}")
        scatter_sum_(parts, idx.to(parts[0].device), val.to(parts[0].dtype))
        for t in parts:
            t.div_(self.size)
        worker.observe(parts, self.size)
        if extra is None:
            return None
        if long_extra:   # summed in place, in pieces (bounds MPI's temporary)
            extra_sum = extra.detach().reshape(-1).clone()
            for piece in extra_sum.split(max(1, EXTRA_ALLREDUCE_BYTES // extra_sum.element_size())):
                self.sum_(piece)
            return extra_sum
        extra_sum = g.extras[0].to(extra.dtype, copy=True)   # in rank order, no stacked n x e copy
        for e in g.extras[1:]:
            extra_sum.add_(e.to(extra.dtype))
        return extra_sum

    # ---------------------------------------------------------------------------- state
    def buffer_bytes(self) -> int:
        """Bytes the compressed path holds between rounds (error memory, workspace, state)."""
        return 0 if self.worker is None else self.worker.buffer_bytes()

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs to continue identically (per rank)."""
        return {"method": "none" if self.compression is None else self.compression.name,
                "num_workers": self.size, "bytes_sent": self.bytes_sent, "rounds": self.rounds,
                "workers": [] if self.worker is None else [self.worker.state_dict()]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (also one written by the exchanger of earlier versions)."""
        method = "none" if self.compression is None else self.compression.name
        if state.get("method", method) != method:
            raise ValueError(f"checkpoint was written with --compress {state['method']}, "
                             f"this run uses {method}")
        workers = state.get("workers", [])
        if self.compression is not None:
            if len(workers) != 1:
                raise ValueError(f"checkpoint has {len(workers)} local workers, expected 1")
            error = torch.as_tensor(workers[0]["memory"]["error"])
            worker = self.worker or self._build(error.numel(), error.dtype, error.device)
            worker.load_state_dict(workers[0])
        self.bytes_sent = int(state.get("bytes_sent", 0))
        self.rounds = int(state.get("rounds", 0))
