"""Random reshuffling per rank (D-RR): a fresh seeded permutation every epoch."""
from __future__ import annotations

import numpy as np

from hpc_dgrab.order.base import Sorter


class RandomReshuffling(Sorter):
    """D-RR: epoch e's order is a permutation seeded by (seed, rank, e); reproducible and resumable."""

    name = "rr"

    def next_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.rank, self.epoch]).permutation(self.num_examples)
