"""Data: built-in sources, partitions, HDF5 shards (one per rank) and their reader. Knows no MPI.

``ShardDataset`` (in :mod:`hpc_dgrab.data.reader`) is imported on first use, because it needs torch
and the shard tool does not.
"""
from typing import Any

from hpc_dgrab.data.partition import PartitionError, parse_partition, partition  # noqa: F401
from hpc_dgrab.data.shards import (  # noqa: F401
    ShardError,
    ensure_shards,
    make_shards,
    read_manifest,
    shards_for_rank,
    verify_files,
)
from hpc_dgrab.data.sources import Source, SourceError, load_source  # noqa: F401


def __getattr__(name: str) -> Any:
    if name == "ShardDataset":
        from hpc_dgrab.data.reader import ShardDataset

        return ShardDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
