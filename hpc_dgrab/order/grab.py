"""GraB (MeanBalance): balance each unit's gradient minus the previous epoch's (stale) mean."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from hpc_dgrab.order.balance import herd_signs
from hpc_dgrab.order.base import BalancingSorter
from hpc_dgrab.order.ghost import Units


class GraB(BalancingSorter):
    """Centralized GraB per rank: c = g - mu_prev, sign by the running sum, front/back placement.

    mu_prev is the mean of the *raw* unit gradients seen in the previous epoch (zero in the first
    epoch); the centred vectors are never accumulated into it. Sends no payload.
    """

    name = "grab"

    def __init__(self, num_examples: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 units: str = "example") -> None:
        self._mean: Optional[np.ndarray] = None
        self._raw_sum: Optional[np.ndarray] = None
        self._raw_count = 0
        super().__init__(num_examples, seed=seed, rank=rank, world_size=world_size, units=units)

    def observe_units(self, unit_grads: Units, units: Sequence[Sequence[int]]) -> Optional[torch.Tensor]:
        ug, d = unit_grads, unit_grads.d
        if self._raw_sum is None:
            self._raw_sum = np.zeros(d)
        mu = self._mean if self._mean is not None else np.zeros(d)
        s = self._running_sum(d)
        # c_i = g_i - mu: <s, c_i> = <s, g_i> - <s, mu>; <c_l, c_i> = G_li - <mu, g_l> - <mu, g_i> + |mu|^2
        sd, md = ug.dots(np.stack([s, mu]))
        g = ug.gram()
        eps = herd_signs(sd - s @ mu, g - md[:, None] - md[None, :] + mu @ mu)
        sums = ug.weighted_sum(np.stack([eps.astype(np.float64), np.ones(ug.n)]))
        s += sums[0] - float(eps.sum()) * mu
        self._raw_sum += sums[1]
        self._raw_count += ug.n
        for unit, e in zip(units, eps.tolist()):
            self._reorder.place(unit, e)
        return None

    def next_order(self) -> np.ndarray:
        if self._raw_count and self._raw_sum is not None:
            self._mean = np.asarray(self._raw_sum / self._raw_count)
        self._raw_sum, self._raw_count = None, 0
        return super().next_order()

    @property
    def stale_mean(self) -> Optional[np.ndarray]:
        """The mean gradient of the previous epoch (None in the first epoch)."""
        return self._mean

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update({"mean": None if self._mean is None else self._mean.copy(),
                      "raw_sum": None if self._raw_sum is None else self._raw_sum.copy(),
                      "raw_count": self._raw_count})
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._mean = None if state.get("mean") is None else np.array(state["mean"], dtype=np.float64)
        self._raw_sum = None if state.get("raw_sum") is None else np.array(state["raw_sum"], dtype=np.float64)
        self._raw_count = int(state.get("raw_count", 0))
