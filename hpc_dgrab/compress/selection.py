"""Top-k selection: how many entries to keep (:func:`k_for`) and which (:func:`topk_indices`).

:func:`topk_indices` takes a score tensor or a :class:`ScoreVector`, a score vector that is read a
piece at a time and never held whole. The answer is the same set as ``torch.topk`` (up to the order
of ties) whatever the path. Pure tensor code: no MPI.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


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


def topk_indices(scores: torch.Tensor | ScoreVector, k: int,
                 workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices of the ``k`` largest entries of a 1-D ``scores`` (unsorted order; the same set as
    ``torch.topk`` up to the order of ties; deterministic). A :class:`ScoreVector` is read in pieces
    of ``workspace``'s length (default :func:`score_piece`), never whole, except in the fall-back
    and below ``THRESHOLD_TOPK_MIN`` entries.

    From ``THRESHOLD_TOPK_MIN`` entries and k at most an eighth of them, a threshold estimated from
    a fixed pseudo-random sample (set low) picks the candidates and ``torch.topk`` runs on those
    only; when fewer than k pass, ``torch.topk`` runs on everything, so the answer is exact.
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


def _topk_by_threshold(scores: torch.Tensor | ScoreVector, k: int,
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
    out: torch.Tensor   # the workspace each piece is written into
    if isinstance(scores, _Dense):
        step, out = n, scores.scores   # one piece; _Dense.piece returns a view and never writes to out
    elif workspace is not None and workspace.dtype == scores.dtype and workspace.numel() > 0:
        step, out = workspace.numel(), workspace
    else:
        step = score_piece(n)
        out = torch.empty(step, dtype=scores.dtype, device=scores.device)
    found, found_scores = [], []
    for start in range(0, n, step):
        stop = min(n, start + step)
        part = scores.piece(start, stop, out)
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
