"""The compressor role: what one worker sends of its error-compensated gradient.

A :class:`Compressor` holds only its parameters (it is hashable and compares by them); everything
that changes from round to round lives in a per-worker ``state`` dict that the caller keeps:

* ``compress(tensor, state, workspace=None) -> (indices, values)`` selects from one flat segment;
* ``observe(state, indices, values, mean_at, num_workers)`` is called after the exchange with the
  round's mean over all workers at this worker's ``indices``, so that a method with memory of the
  last round (RegTop-k) can update ``state``.

One file per method (:mod:`.topk`, :mod:`.regtopk`). No MPI here.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Dict, Optional, Tuple

import torch

from hpc_dgrab.compress.selection import k_for

log = logging.getLogger(__name__)

#: a worker's per-segment compressor state (tensors only, so that it checkpoints as is)
State = Dict[str, torch.Tensor]


class Compressor(ABC):
    """Base of the sparsifying compressors: keep ``density`` of a segment's entries, or ``k``."""

    #: the ``--compress`` name of the method (and of the checkpoint's ``method`` field)
    name: str = "base"

    def __init__(self, density: Optional[float] = None, k: Optional[int] = None) -> None:
        if density is not None and not 0 < float(density) <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if k is not None and int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if density is None and k is None:
            raise ValueError(f"{self.name}: give density or k")
        self.density = None if density is None else float(density)
        self.k = None if k is None else int(k)

    def k_for(self, numel: int) -> int:
        """Entries this compressor keeps of a segment of ``numel`` entries."""
        return k_for(numel, self.density, self.k)

    @abstractmethod
    def compress(self, tensor: torch.Tensor, state: State,
                 workspace: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Select from a 1-D ``tensor``: (int64 indices, values = tensor[indices]).

        ``workspace``: optional 1-D tensor of ``tensor``'s dtype (overwritten; see
        :func:`~hpc_dgrab.compress.selection.score_piece` for its length) through which the scores
        of a long tensor are scanned a piece at a time (no score vector of the tensor's size)."""

    def observe(self, state: State, indices: torch.Tensor, values: torch.Tensor,  # noqa: B027 (a no-op hook)
                mean_at: torch.Tensor, num_workers: int) -> None:
        """After the exchange: ``mean_at`` is the mean over workers at ``indices``."""

    def params(self) -> Dict[str, Optional[float]]:
        """The constructor's arguments (what equality, hashing and ``repr`` use)."""
        return {"density": self.density, "k": self.k}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params() == self.params()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.params().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if v is not None)
        return f"{type(self).__name__}({args})"
