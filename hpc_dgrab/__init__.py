"""hpc_dgrab: MPI data-parallel training with gossip DASGD, sparse RegTop-k all-gather,
D-GraB example ordering and GradAlign, on HDF5-sharded data.

The public API is shaped like Horovod's::

    import hpc_dgrab as hd
    hd.init()
    hd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters(),
                                  compression=hd.RegTopK(density=0.01))   # or None for dense
    ...
    hd.shutdown()          # optional: ends the communication threads and frees the communicators

Importing the package initialises nothing (no MPI, no torch): the names below are loaded on first
use (PEP 562), so ``import hpc_dgrab.data`` stays cheap. See :mod:`hpc_dgrab.runtime`.
"""
from importlib import import_module
from typing import Any, List

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "init": "hpc_dgrab.api", "is_initialized": "hpc_dgrab.api", "rank": "hpc_dgrab.api",
    "size": "hpc_dgrab.api", "local_rank": "hpc_dgrab.api", "local_size": "hpc_dgrab.api",
    "broadcast_parameters": "hpc_dgrab.api", "broadcast_optimizer_state": "hpc_dgrab.api",
    "broadcast_object": "hpc_dgrab.api",
    "shutdown": "hpc_dgrab.api",
    "DistributedOptimizer": "hpc_dgrab.optim.distributed", "TopK": "hpc_dgrab.compress",
    "RegTopK": "hpc_dgrab.compress", "Payload": "hpc_dgrab.optim.buckets",
    "OrderedSampler": "hpc_dgrab.optim.sampler",
    "GossipOptimizer": "hpc_dgrab.optim.gossip_optimizer",
    "GradAlign": "hpc_dgrab.optim.gradalign",
    "UserError": "hpc_dgrab.errors",
    # --- hvdops
    "cross_rank": "hpc_dgrab.api", "cross_size": "hpc_dgrab.api",
    "mpi_built": "hpc_dgrab.ops.build", "mpi_enabled": "hpc_dgrab.ops.build",
    "mpi_threads_supported": "hpc_dgrab.ops.build", "gloo_built": "hpc_dgrab.ops.build",
    "gloo_enabled": "hpc_dgrab.ops.build", "nccl_built": "hpc_dgrab.ops.build",
    "cuda_built": "hpc_dgrab.ops.build", "rocm_built": "hpc_dgrab.ops.build",
    "ddl_built": "hpc_dgrab.ops.build", "ccl_built": "hpc_dgrab.ops.build",
    "Average": "hpc_dgrab.ops.reduce_ops", "Sum": "hpc_dgrab.ops.reduce_ops",
    "Adasum": "hpc_dgrab.ops.reduce_ops", "Min": "hpc_dgrab.ops.reduce_ops",
    "Max": "hpc_dgrab.ops.reduce_ops", "Product": "hpc_dgrab.ops.reduce_ops",
    "allreduce": "hpc_dgrab.ops.allreduce", "allreduce_": "hpc_dgrab.ops.allreduce",
    "allreduce_async": "hpc_dgrab.ops.allreduce", "allreduce_async_": "hpc_dgrab.ops.allreduce",
    "grouped_allreduce": "hpc_dgrab.ops.allreduce", "grouped_allreduce_": "hpc_dgrab.ops.allreduce",
    "grouped_allreduce_async": "hpc_dgrab.ops.allreduce",
    "grouped_allreduce_async_": "hpc_dgrab.ops.allreduce",
    "allgather": "hpc_dgrab.ops.gather", "allgather_async": "hpc_dgrab.ops.gather",
    "grouped_allgather": "hpc_dgrab.ops.gather", "grouped_allgather_async": "hpc_dgrab.ops.gather",
    "broadcast": "hpc_dgrab.ops.gather", "broadcast_": "hpc_dgrab.ops.gather",
    "broadcast_async": "hpc_dgrab.ops.gather", "broadcast_async_": "hpc_dgrab.ops.gather",
    "alltoall": "hpc_dgrab.ops.gather", "alltoall_async": "hpc_dgrab.ops.gather",
    "reducescatter": "hpc_dgrab.ops.reducescatter", "reducescatter_async": "hpc_dgrab.ops.reducescatter",
    "grouped_reducescatter": "hpc_dgrab.ops.reducescatter",
    "grouped_reducescatter_async": "hpc_dgrab.ops.reducescatter",
    "sparse_allreduce_async": "hpc_dgrab.ops.sparse",
    "synchronize": "hpc_dgrab.ops.submit", "poll": "hpc_dgrab.ops.submit",
    "join": "hpc_dgrab.ops.control", "barrier": "hpc_dgrab.ops.control",
    "ProcessSet": "hpc_dgrab.ops.process_sets", "add_process_set": "hpc_dgrab.ops.process_sets",
    "remove_process_set": "hpc_dgrab.ops.process_sets", "global_process_set": "hpc_dgrab.ops.process_sets",
    "start_timeline": "hpc_dgrab.ops.timeline", "stop_timeline": "hpc_dgrab.ops.timeline",
    "HorovodInternalError": "hpc_dgrab.ops.exceptions", "HostsUpdatedInterrupt": "hpc_dgrab.ops.exceptions",
    "OpMismatchError": "hpc_dgrab.ops.exceptions", "OpArgumentError": "hpc_dgrab.ops.exceptions",
    # --- hvdtrain
    "Compression": "hpc_dgrab.compress.cast",
    "SyncBatchNorm": "hpc_dgrab.sync_batchnorm", "allgather_object": "hpc_dgrab.api",
    "elastic": "hpc_dgrab.elastic",
    # --- ddp
    "ddp": "hpc_dgrab.ddp", "ddp_order": "hpc_dgrab.ddp_order",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hpc_dgrab' has no attribute {name!r}")
    if module == "hpc_dgrab." + name:   # a subpackage exported by name (hd.elastic)
        value = import_module(module)
    else:
        value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(list(globals()) + __all__)
