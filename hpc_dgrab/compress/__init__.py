"""Gradient compression with error feedback (GRACE roles): ``none``, ``topk``, ``regtopk``.

Typical use on the synchronous path (one worker per rank)::

    ex = make_exchanger("regtopk", numel=grad.numel(), num_workers=comm.size,
                        communicator=MPICommunicator(), density=0.01, mu=4.0)
    mean, extra_sum = ex.exchange(grad, extra)        # the SyncSGD exchanger contract
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from hpc_dgrab.compress.base import (CompressedExchanger, Compressor, ErrorFeedback, FlatParts,
                                     LocalCommunicator,
                                     MPICommunicator, SparseWorker, k_for, message_bytes, topk_indices,
                                     worker_range)
from hpc_dgrab.compress.none import NoneCompressor
from hpc_dgrab.compress.regtopk import Q_DEFAULT, RegTopKCompressor, regtopk_scores
from hpc_dgrab.compress.topk import TopKCompressor

__all__ = ["METHODS", "CompressedExchanger", "Compressor", "ErrorFeedback", "FlatParts", "LocalCommunicator",
           "MPICommunicator", "NoneCompressor", "Q_DEFAULT", "RegTopKCompressor", "SparseWorker",
           "TopKCompressor", "k_for", "make_compressor", "make_exchanger", "message_bytes", "regtopk_scores",
           "topk_indices", "worker_range"]

METHODS = ("none", "topk", "regtopk")


def make_compressor(method: str, density: Optional[float] = None, k: Optional[int] = None,
                    mu: float = 4.0, q: float = Q_DEFAULT) -> Compressor:
    """The compressor of ``method`` (one of :data:`METHODS`) with its parameters."""
    if method == "none":
        return NoneCompressor()
    if method == "topk":
        return TopKCompressor(density=density, k=k)
    if method == "regtopk":
        return RegTopKCompressor(density=density, k=k, mu=mu, q=q)
    raise ValueError(f"unknown compression method {method!r}; choose from {', '.join(METHODS)}")


def make_exchanger(method: str, numel: Optional[int], num_workers: int, communicator: Any,
                   local_workers: int = 1, segment_sizes: Optional[Sequence[int]] = None,
                   dtype: Optional[torch.dtype] = None, device: Any = None,
                   **params: Any) -> CompressedExchanger:
    """A :class:`CompressedExchanger` of ``method`` with ``local_workers`` fresh workers on this rank.

    ``params``: ``density`` / ``k``, ``mu``, ``q`` (see :func:`make_compressor`); ``numel`` None:
    sized by the first gradient; ``segment_sizes``: compress per tensor (e.g.
    ``[p.numel() for p in model.parameters()]``).
    """
    compressor = make_compressor(method, **params)
    return CompressedExchanger(compressor, num_workers, communicator, local_workers=local_workers,
                               numel=numel, segment_sizes=segment_sizes, dtype=dtype, device=device)
