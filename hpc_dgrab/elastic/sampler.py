"""``ElasticSampler``: Horovod's sampler that gives each rank its share of the samples not yet
processed this epoch, and resumes an epoch after a restart without repeating them.

Each epoch the unprocessed indices (in order, or permuted with seed ``seed + epoch``) are padded
to a multiple of the number of ranks and dealt round-robin. ``record_batch(i, n)`` /
``record_indices(ix)`` mark indices as processed; ``state_dict()`` holds the epoch and the
processed indices (a sorted list); :meth:`merge_ranks` (called by ``State.sync``) makes the
processed set the union over ranks.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterable, Iterator, List, Sized

import torch
from torch.utils.data import Sampler

from hpc_dgrab import api

log = logging.getLogger(__name__)

__all__ = ["ElasticSampler"]


class ElasticSampler(Sampler[int]):
    """This rank's indices of ``dataset`` among those not processed this epoch."""

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int = 0) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.processed_indices: set = set()
        self.indices: List[int] = []
        self.num_samples = 0
        self.reset()

    def reset(self) -> None:
        """Recompute this rank's indices (after a change of epoch or of the processed set)."""
        ranks, me = api.size(), api.rank()
        todo = [i for i in range(len(self.dataset)) if i not in self.processed_indices]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            todo = [todo[j] for j in torch.randperm(len(todo), generator=g).tolist()]
        self.num_samples = int(math.ceil(len(todo) / ranks)) if todo else 0
        total = self.num_samples * ranks
        padded = todo + todo[:total - len(todo)]
        self.indices = padded[me:total:ranks]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: nothing processed yet."""
        self.epoch = int(epoch)
        self.processed_indices = set()
        self.reset()

    def get_indices(self, batch_idx: int, batch_size: int) -> List[int]:
        """This rank's indices of batch ``batch_idx``."""
        lo = batch_idx * batch_size
        return self.indices[lo:min(lo + batch_size, len(self.indices))]

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """Mark this rank's batch ``batch_idx`` as processed."""
        self.record_indices(self.get_indices(batch_idx, batch_size))

    def record_indices(self, indices: Iterable[int]) -> None:
        self.processed_indices.update(int(i) for i in indices)

    def merge_ranks(self) -> None:
        """Collective: the processed set becomes the union over ranks."""
        everyone = api.allgather_object(sorted(self.processed_indices))
        self.processed_indices = set(i for part in everyone for i in part)

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "processed_indices": sorted(self.processed_indices)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.epoch = int(state_dict["epoch"])
        self.processed_indices = set(int(i) for i in state_dict["processed_indices"])
        self.reset()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples
