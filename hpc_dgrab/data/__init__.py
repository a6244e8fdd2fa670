"""Data: built-in sources, partitions, HDF5 shards (one per rank) and their reader. Knows no MPI."""
from hpc_dgrab.data.partition import PartitionError, parse_partition, partition  # noqa: F401
from hpc_dgrab.data.shards import (ShardDataset, ShardError, ensure_shards, make_shards,  # noqa: F401
                                   read_manifest, shards_for_rank, verify_files)
from hpc_dgrab.data.sources import Source, SourceError, load_source  # noqa: F401
