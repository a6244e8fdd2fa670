"""This rank's training shard and validation slice (:func:`open_data`); a built-in source name is
sharded once, by rank 0, into ``--data-cache``. Problems are one collective ``--data: ...`` line."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional, Tuple

from hpc_dgrab import runtime
from hpc_dgrab.errors import UserError, agree
from hpc_dgrab.training.config import TrainConfig

if TYPE_CHECKING:
    from mpi4py import MPI

    from hpc_dgrab.data import ShardDataset

log = logging.getLogger(__name__)


def open_data(cfg: TrainConfig, rt: runtime.Runtime,
              comm: MPI.Comm) -> Tuple[ShardDataset, ShardDataset]:
    """Collective: (this rank's training shard, its validation slice)."""
    from hpc_dgrab.data import ShardDataset, ShardError, SourceError
    from hpc_dgrab.data.sources import BUILTIN

    root, problem = cfg.data, None
    if not os.path.isdir(root):
        if root not in BUILTIN and not root.endswith(".npz"):
            raise UserError(f"--data: {root}: no such shard directory (nor a built-in source: "
                            f"{', '.join(BUILTIN)})", collective=True)
        name = os.path.splitext(os.path.basename(root))[0]
        root = os.path.join(cfg.data_cache, f"{name}-{rt.size}shards-{cfg.partition}-s{cfg.seed}")
        if rt.rank == 0:
            from hpc_dgrab.data import ensure_shards

            try:
                ensure_shards(cfg.data, root, shards=rt.size, partition=cfg.partition, seed=cfg.seed)
            except (SourceError, ShardError, ValueError) as exc:
                problem = f"--data: {exc}"
            except OSError as exc:  # a read-only or full --data-cache: the user's to fix
                problem = (f"--data-cache {cfg.data_cache}: cannot write the shards of {cfg.data}: "
                           f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else ""))
    agree(problem, comm)
    train: Optional[ShardDataset] = None
    val: Optional[ShardDataset] = None
    try:
        train = ShardDataset(root, rt.rank, rt.size, split="train")
        val = ShardDataset(root, rt.rank, rt.size, split="val")
        if len(train) == 0:
            problem = f"--data: {root}: shard of rank {rt.rank} is empty"
        elif train.num_classes < 1:
            problem = (f"--data: {root}: the trainer needs integer class labels; the shards hold "
                       f"{train.manifest.get('y_dtype', 'float')} targets")
    except (ShardError, OSError, ValueError) as exc:
        problem = f"--data: {exc}"
    agree(problem, comm)
    assert train is not None and val is not None
    return train, val
