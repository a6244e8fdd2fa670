"""The sorter interface: a per-rank, per-epoch order over this rank's local examples."""
from __future__ import annotations

from typing import Any, Dict, Iterator

import numpy as np
import torch


class Sorter(torch.utils.data.Sampler):
    """Order of this rank's ``num_examples`` local examples, one permutation per epoch.

    Usable as a torch ``Sampler`` (iterates the current epoch's order). Sorters that learn from
    gradients set ``needs_grads = True`` and receive each step's balancing units; every sorter's
    state round-trips through ``state_dict``/``load_state_dict`` so a resumed run continues with
    the same order.
    """

    name = "base"
    needs_grads = False

    def __init__(self, num_examples: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if num_examples < 1:
            raise ValueError(f"a sorter needs at least one example, got {num_examples}")
        self.num_examples = int(num_examples)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self._order = self.first_order()

    def first_order(self) -> np.ndarray:
        """The first epoch's order: a permutation seeded by (seed, rank)."""
        return np.random.default_rng([self.seed, self.rank]).permutation(self.num_examples)

    def epoch_order(self) -> np.ndarray:
        """This epoch's order of local example indices (a permutation of 0..num_examples-1)."""
        return self._order

    def end_epoch(self) -> None:
        """Advance to the next epoch (computes the next order)."""
        self.epoch += 1
        self._order = self.next_order()

    def next_order(self) -> np.ndarray:
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        return iter(self._order.tolist())

    def __len__(self) -> int:
        return self.num_examples

    def state_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "epoch": self.epoch, "order": self._order.copy(),
                "num_examples": self.num_examples, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("name") != self.name or state.get("num_examples") != self.num_examples:
            raise ValueError(f"checkpoint holds a {state.get('name')} order of {state.get('num_examples')} "
                             f"examples, not {self.name} of {self.num_examples}")
        self.epoch = int(state["epoch"])
        self._order = np.asarray(state["order"], dtype=np.int64)


def make_sorter(name: str, num_examples: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                **options: Any) -> Sorter:
    """Build the sorter called ``name`` (``rr``, ...) for this rank's local examples."""
    from hpc_dgrab.order.rr import RandomReshuffling

    sorters = {RandomReshuffling.name: RandomReshuffling}
    if name not in sorters:
        raise ValueError(f"unknown order {name!r}; choose from {', '.join(sorted(sorters))}")
    return sorters[name](num_examples, seed=seed, rank=rank, world_size=world_size, **options)
