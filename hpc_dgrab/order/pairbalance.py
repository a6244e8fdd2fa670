"""PairBalance per rank (also the "independent" / naive parallel GraB baseline across ranks)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from hpc_dgrab.order.balance import balance_sign
from hpc_dgrab.order.base import BalancingSorter


class PairBalance(BalancingSorter):
    """Balance the differences of consecutive unit pairs against this rank's own running sum.

    Pair (a, b) with c = g_a - g_b: if <s, c> <= 0 then s += c and a goes to the front, b to the
    back; else s -= c and b goes front, a back. The mean cancels within each pair, so no stale mean
    is needed. Sends no payload: on N ranks every rank balances alone.
    """

    name = "pairbalance"

    def observe(self, unit_grads: Any, units: Sequence[Sequence[int]]) -> Optional[torch.Tensor]:
        for first, second, diff in self._pairs(unit_grads, units):
            c = diff.double().numpy()
            s = self._running_sum(c.size)
            eps = balance_sign(s, c)
            s += eps * c
            self._reorder.place_pair(first, second, eps)
        return None
