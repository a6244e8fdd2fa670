"""Gradient compression with error feedback, in GRACE's roles.

* :mod:`.selection` — how many entries to keep and which (top-k machinery);
* :mod:`.memory` — :class:`ErrorFeedback`;
* :mod:`.base` — the :class:`Compressor` role; one file per method: :class:`TopK`, :class:`RegTopK`;
* :mod:`.exchange` — :class:`SparseWorker` (one worker's numerics) and :class:`GradientExchange`
  (dense or sparse averaging over a transport), which ``DistributedOptimizer`` and GradAlign use.

Users pass the compressor object: ``DistributedOptimizer(opt, compression=hd.RegTopK(0.01))``.
"""
from __future__ import annotations

import logging
from typing import Optional

from hpc_dgrab.compress.base import Compressor
from hpc_dgrab.compress.exchange import GradientExchange, SparseWorker
from hpc_dgrab.compress.memory import ErrorFeedback
from hpc_dgrab.compress.regtopk import Q_DEFAULT, RegTopK, regtopk_scores
from hpc_dgrab.compress.selection import k_for, topk_indices
from hpc_dgrab.compress.topk import TopK

log = logging.getLogger(__name__)

__all__ = ["METHODS", "Compressor", "ErrorFeedback", "GradientExchange", "Q_DEFAULT", "RegTopK",
           "SparseWorker", "TopK", "k_for", "make_compressor", "regtopk_scores", "topk_indices"]

#: the ``--compress`` names
METHODS = ("none", "topk", "regtopk")


def make_compressor(method: str, density: Optional[float] = None, k: Optional[int] = None,
                    mu: float = 4.0, q: float = Q_DEFAULT) -> Optional[Compressor]:
    """The compressor named ``method`` (one of :data:`METHODS`) with its parameters; ``"none"``
    gives None (no compression: the exchange is a dense all-reduce)."""
    if method == "none":
        return None
    if method == "topk":
        return TopK(density, k=k)
    if method == "regtopk":
        return RegTopK(density, k=k, mu=mu, q=q)
    raise ValueError(f"unknown compression method {method!r}; choose from {', '.join(METHODS)}")
