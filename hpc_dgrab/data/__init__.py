"""Data: built-in sources, partitions, HDF5 shards (one per rank) and their reader. Knows no MPI."""
from hpc_dgrab.data.shards import ShardDataset, ShardError, read_manifest  # noqa: F401
from hpc_dgrab.data.sources import Source, SourceError, load_source  # noqa: F401
