"""PairBalance per rank (also the "independent" / naive parallel GraB baseline across ranks)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from hpc_dgrab.order.base import BalancingSorter
from hpc_dgrab.order.ghost import Units


class PairBalance(BalancingSorter):
    """Balance the differences of consecutive unit pairs against this rank's own running sum.

    Pair (a, b) with c = g_a - g_b: if <s, c> <= 0 then s += c and a goes to the front, b to the
    back; else s -= c and b goes front, a back. The mean cancels within each pair, so no stale mean
    is needed. Sends no payload: on N ranks every rank balances alone.
    """

    name = "pairbalance"

    def observe_units(self, unit_grads: Units, units: Sequence[Sequence[int]]) -> Optional[torch.Tensor]:
        step = self._pair_step(unit_grads, units)
        if step.pairs:
            s = self._running_sum(unit_grads.d)
            eps = step.signs(s)
            s += step.signed_sum(eps)
            for (first, second), e in zip(step.pairs, eps.tolist()):
                self._reorder.place_pair(first, second, e)
        return None
