"""``topk``: keep the k entries of largest magnitude of the error-compensated gradient."""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from hpc_dgrab.compress.base import Compressor, State
from hpc_dgrab.compress.selection import AbsScores, topk_indices

log = logging.getLogger(__name__)


class TopK(Compressor):
    """Top-k by ``|a|``: ``density`` (k = round(density * numel), at least 1) or ``k`` entries.

    Stateless between rounds; with error feedback it is Top-k with error feedback (RegTop-k with
    every weight fixed to 1)."""

    name = "topk"

    def __init__(self, density: Optional[float] = None, *, k: Optional[int] = None) -> None:
        super().__init__(density=density, k=k)

    def compress(self, tensor: torch.Tensor, state: State,
                 workspace: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        flat = tensor.reshape(-1)
        idx = topk_indices(AbsScores(flat), self.k_for(flat.numel()), workspace)
        return idx, flat.index_select(0, idx)
