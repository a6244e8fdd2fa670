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
    "broadcast_object": "hpc_dgrab.api", "allreduce": "hpc_dgrab.api",
    "shutdown": "hpc_dgrab.api",
    "DistributedOptimizer": "hpc_dgrab.optim.distributed", "TopK": "hpc_dgrab.compress",
    "RegTopK": "hpc_dgrab.compress", "Payload": "hpc_dgrab.optim.buckets",
    "OrderedSampler": "hpc_dgrab.optim.sampler",
    "GossipOptimizer": "hpc_dgrab.optim.gossip_optimizer",
    "GradAlign": "hpc_dgrab.optim.gradalign",
    "UserError": "hpc_dgrab.errors",
    # --- ddp
    "ddp": "hpc_dgrab.ddp", "ddp_order": "hpc_dgrab.ddp_order",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hpc_dgrab' has no attribute {name!r}")
    # a submodule (``hd.ddp``) is its own value
    value = import_module(module) if module == f"{__name__}.{name}" else getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(list(globals()) + __all__)
