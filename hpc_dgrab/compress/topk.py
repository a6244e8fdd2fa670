"""``topk``: keep the k entries of largest magnitude of the error-compensated gradient."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from hpc_dgrab.compress.base import AbsScores, Compressor, State, topk_indices


class TopKCompressor(Compressor):
    """Top-k by ``|a|`` (:func:`~hpc_dgrab.compress.base.topk_indices`: the scores are scanned a piece
    at a time, no d-sized temporary).

    Parameters: ``density`` (fraction kept, k = round(density * numel), at least 1) or ``k``.
    Stateless between rounds; with :class:`~hpc_dgrab.compress.base.ErrorFeedback` it is Top-k
    with error feedback (RegTop-k with every posterior weight fixed to 1).
    """

    name = "topk"

    def __init__(self, density: Optional[float] = None, k: Optional[int] = None) -> None:
        super().__init__(density=density, k=k)

    def compress(self, tensor: torch.Tensor, state: State,
                 workspace: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        flat = tensor.reshape(-1)
        idx = topk_indices(AbsScores(flat), self.k_for(flat.numel()), workspace)
        return idx, flat.index_select(0, idx), None
