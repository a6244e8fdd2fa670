"""Virtual workers: N compressed-SGD workers simulated on fewer processes (down to one).

:class:`VirtualWorkers` holds this process's share of N workers (``hpc_dgrab.compress.SparseWorker``
objects, the library's own per-worker numerics); ``exchange_many(grads)`` compresses each local
worker's gradient, sums every worker's selection over a :class:`Communicator`, divides by N, hands
the mean to each worker's ``observe`` and returns it. Method ``"none"`` sums the gradients densely.
``bytes_sent`` counts what this process handed to the network (cumulative).

Communicators: :class:`LocalCommunicator` (one process, no MPI: the "sum" is this process's own
message) and :class:`MPICommunicator` (mpi4py all-gather / all-reduce over a communicator).
:func:`worker_range` spreads N workers over the ranks; :func:`density_label` formats a density.
"""
from __future__ import annotations

import logging
import math
from typing import Any, List, Protocol, Sequence, Tuple

import numpy as np
import torch

from hpc_dgrab.compress import SparseWorker, make_compressor

log = logging.getLogger(__name__)

#: a dense length up to this travels with int32 indices (the library's wire rule)
INT32_LIMIT = 2 ** 31 - 1


class Communicator(Protocol):
    """How the workers' messages are summed across processes."""

    size: int
    rank: int

    def allreduce_sum_(self, buf: torch.Tensor) -> int:
        """Sum ``buf`` (1-D, contiguous, CPU) over processes in place; bytes this process sent."""
        ...

    def sparse_sum(self, indices: torch.Tensor, values: torch.Tensor, numel: int,
                   same_sizes: bool) -> Tuple[torch.Tensor, int]:
        """(dense sum of every process's sparse vector, bytes this process sent)."""
        ...


def message_bytes(k: int, numel: int, value_dtype: torch.dtype) -> int:
    """Bytes of one sparse message: ``k`` indices (int32 below 2**31 entries) and ``k`` values."""
    index_size = 4 if numel <= INT32_LIMIT else 8
    return k * (index_size + torch.empty(0, dtype=value_dtype).element_size())


def _scatter_sum(numel: int, pieces: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                 dtype: torch.dtype) -> torch.Tensor:
    """Dense sum of sparse pieces, added in order (the same bits on every process)."""
    dense = torch.zeros(numel, dtype=dtype)
    for idx, val in pieces:
        dense.index_add_(0, idx, val.to(dtype))
    return dense


class LocalCommunicator:
    """One process, no MPI."""

    size = 1
    rank = 0

    def allreduce_sum_(self, buf: torch.Tensor) -> int:
        return buf.numel() * buf.element_size()

    def sparse_sum(self, indices: torch.Tensor, values: torch.Tensor, numel: int,
                   same_sizes: bool = False) -> Tuple[torch.Tensor, int]:
        dense = _scatter_sum(numel, [(indices, values)], values.dtype)
        return dense, message_bytes(indices.numel(), numel, values.dtype)


class MPICommunicator:
    """All-gather of ``[indices]``, ``[values]`` / in-place all-reduce over an mpi4py communicator.

    Sizes are exchanged first (8 bytes per process) unless ``same_sizes``; the gathered pieces are
    summed in rank order, so every process holds the same bits.
    """

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.size, self.rank = comm.size, comm.rank

    def allreduce_sum_(self, buf: torch.Tensor) -> int:
        from mpi4py import MPI

        self.comm.Allreduce(MPI.IN_PLACE, buf.numpy())
        return buf.numel() * buf.element_size()

    def sparse_sum(self, indices: torch.Tensor, values: torch.Tensor, numel: int,
                   same_sizes: bool = False) -> Tuple[torch.Tensor, int]:
        idx_dtype = np.int32 if numel <= INT32_LIMIT else np.int64
        idx = np.ascontiguousarray(indices.numpy().astype(idx_dtype, copy=False))
        val = np.ascontiguousarray(values.detach().numpy())
        k = idx.size
        extra = 0
        if same_sizes:
            counts = [k] * self.size
        else:
            counts = [int(c) for c in self.comm.allgather(k)]
            extra = 8
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()
        all_idx = np.empty(sum(counts), dtype=idx_dtype)
        all_val = np.empty(sum(counts), dtype=val.dtype)
        self.comm.Allgatherv(idx, [all_idx, (counts, displs)])
        self.comm.Allgatherv(val, [all_val, (counts, displs)])
        pieces = [(torch.from_numpy(all_idx[d:d + c].astype(np.int64)), torch.from_numpy(all_val[d:d + c]))
                  for c, d in zip(counts, displs)]
        return _scatter_sum(numel, pieces, values.dtype), message_bytes(k, numel, values.dtype) + extra


def worker_range(num_workers: int, rank: int, size: int) -> range:
    """The workers rank ``rank`` of ``size`` hosts: a contiguous block (sizes differ by <= 1)."""
    if num_workers < size:
        raise ValueError(f"{num_workers} workers cannot be spread over {size} ranks (need workers >= ranks)")
    return range(rank * num_workers // size, (rank + 1) * num_workers // size)


def density_label(density: float) -> str:
    """``0.001`` -> ``"0.1%"`` (for tables)."""
    pct = density * 100
    return f"{pct:g}%" if not math.isclose(pct, round(pct)) else f"{int(round(pct))}%"


class VirtualWorkers:
    """``local_workers`` of ``num_workers`` workers of one method on this process.

    ``method``: ``"none"`` (dense sum), ``"topk"`` or ``"regtopk"`` with ``params`` as
    ``hpc_dgrab.compress.make_compressor`` takes them (``density`` / ``k``, ``mu``, ``q``).
    """

    def __init__(self, method: str, numel: int, num_workers: int, communicator: Communicator,
                 local_workers: int = 1, dtype: torch.dtype = torch.float32, **params: Any) -> None:
        if local_workers < 1:
            raise ValueError("need at least one local worker")
        if num_workers < local_workers:
            raise ValueError(f"{local_workers} local workers but only {num_workers} in total")
        self.method = method
        self.numel, self.num_workers = int(numel), int(num_workers)
        self.communicator = communicator
        self.dense = method == "none"
        self.workers: List[SparseWorker] = []
        if not self.dense:
            compressor = make_compressor(method, **params)
            self.workers = [SparseWorker(compressor, self.numel, dtype=dtype, device="cpu")
                            for _ in range(local_workers)]
        self.local_workers = int(local_workers)
        self.bytes_sent = 0
        # every process sends the same k only if it hosts the same number of workers
        self._same_sizes = self.num_workers % communicator.size == 0

    @property
    def k(self) -> int:
        """Entries each worker sends per round (``numel`` for ``"none"``)."""
        return self.numel if self.dense else self.workers[0].k

    def exchange_many(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Every local worker's flat gradient -> the mean over all N workers' sent vectors."""
        if len(grads) != self.local_workers:
            raise ValueError(f"{len(grads)} gradients for {self.local_workers} local workers")
        if self.dense:
            total = grads[0].detach().reshape(-1).clone()
            for g in grads[1:]:
                total += g.detach().reshape(-1)
            self.bytes_sent += self.communicator.allreduce_sum_(total)
            return total.div_(self.num_workers)
        parts = [w.compress(g) for w, g in zip(self.workers, grads)]
        indices = torch.cat([p[0] for p in parts])
        values = torch.cat([p[1] for p in parts])
        total, nbytes = self.communicator.sparse_sum(indices, values, self.numel, self._same_sizes)
        self.bytes_sent += nbytes
        mean = total.div_(self.num_workers)
        for w in self.workers:
            w.observe(mean, self.num_workers)
        return mean

    def exchange(self, grad: torch.Tensor) -> torch.Tensor:
        """One local worker: the mean over all workers, shaped like ``grad``."""
        return self.exchange_many([grad]).view_as(grad)
