"""``regtopk``: regularized Top-k (RegTop-k), per worker and round.

With ``a = grad + e`` the error-compensated gradient and ``N`` workers::

    r[j] = N * gbar_prev[j] / v_prev[j]   where this worker sent j last round and v_prev[j] != 0
         = Q                              elsewhere (Q = 1e8)
    score[j] = tanh(|r[j]| / mu) * |a[j]|;    send the k largest scores

Round one (no history) is Top-k; so is mu -> 0. Per-segment state, enough for an exact resume:
``idx`` (positions sent last round), ``val`` (the values sent) and ``agg`` (N * gbar_prev there).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Tuple

import torch

from hpc_dgrab.compress.base import Compressor, State
from hpc_dgrab.compress.selection import ScoreVector, topk_indices

log = logging.getLogger(__name__)

#: the ratio assumed where this worker has no information (did not send the entry last round)
Q_DEFAULT = 1e8


class RegTopKScores(ScoreVector):
    """``tanh(|r| / mu) * |a|`` of a 1-D ``a`` and a RegTop-k ``state``, read a piece at a time:
    every entry is ``tanh(Q / mu) * |a[j]|`` except at last round's k positions, whose scores are
    computed once here (k numbers)."""

    def __init__(self, a: torch.Tensor, state: State, mu: float, q: float = Q_DEFAULT) -> None:
        super().__init__(a.numel(), a.dtype, a.device)
        self.a = a.reshape(-1)
        self.w_other = math.tanh(q / mu)
        self.idx: Optional[torch.Tensor] = None
        idx = state.get("idx")
        if idx is not None and idx.numel():
            v = state["val"].to(a.dtype)
            s = state["agg"].to(a.dtype)
            sent = v != 0  # guard: an entry sent with value 0 carries no information -> Q
            r = torch.where(sent, s / torch.where(sent, v, torch.ones_like(v)), torch.full_like(v, q))
            over = self.a.index_select(0, idx).abs_().mul_(torch.tanh(r.abs_().div_(mu)))
            order = torch.argsort(idx)
            self.idx, self.over = idx[order], over[order]

    def _others(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.w_other) if self.w_other != 1.0 else x

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        out = self._others(self.a[positions].abs_())
        if self.idx is not None:
            loc = torch.searchsorted(self.idx, positions).clamp_(max=self.idx.numel() - 1)
            hit = self.idx[loc] == positions
            out[hit] = self.over[loc[hit]]
        return out

    def piece(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        x = self._others(torch.abs(self.a[start:stop], out=out[:stop - start]))
        if self.idx is not None:
            bounds = torch.tensor([start, stop], device=self.idx.device)
            lo, hi = torch.searchsorted(self.idx, bounds).tolist()
            if hi > lo:
                x[self.idx[lo:hi] - start] = self.over[lo:hi]
        return x


def regtopk_scores(a: torch.Tensor, state: State, mu: float, q: float = Q_DEFAULT,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``tanh(|r| / mu) * |a|`` for a 1-D ``a`` and a RegTop-k ``state`` (empty state: round one);
    written into ``out`` (like ``a``) when given. The whole vector of :class:`RegTopKScores`."""
    scores = RegTopKScores(a, state, mu, q)
    return scores.full() if out is None else scores.piece(0, scores.numel, out.reshape(-1))


class RegTopK(Compressor):
    """RegTop-k: Top-k on the score :func:`regtopk_scores`; ``density`` or ``k`` (as Top-k), ``mu``
    (regularisation), ``q`` (the ratio assumed for entries not sent last round)."""

    name = "regtopk"

    def __init__(self, density: Optional[float] = None, *, k: Optional[int] = None, mu: float = 4.0,
                 q: float = Q_DEFAULT) -> None:
        super().__init__(density=density, k=k)
        if not mu > 0:
            raise ValueError(f"mu must be > 0, got {mu}")
        if not q > 0:
            raise ValueError(f"Q must be > 0, got {q}")
        self.mu, self.q = float(mu), float(q)

    def compress(self, tensor: torch.Tensor, state: State,
                 workspace: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        flat = tensor.reshape(-1)
        idx = topk_indices(RegTopKScores(flat, state, self.mu, self.q), self.k_for(flat.numel()), workspace)
        return idx, flat.index_select(0, idx)

    def observe(self, state: State, indices: torch.Tensor, values: torch.Tensor,
                mean_at: torch.Tensor, num_workers: int) -> None:
        """Remember this round's positions, own values and N * mean there."""
        state["idx"] = indices.detach().clone()
        state["val"] = values.detach().clone()
        state["agg"] = mean_at * num_workers

    def params(self) -> Dict[str, Optional[float]]:
        return {"density": self.density, "k": self.k, "mu": self.mu, "q": self.q}
