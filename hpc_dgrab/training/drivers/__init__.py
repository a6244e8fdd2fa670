"""The training drivers, one per method, behind :class:`~hpc_dgrab.training.drivers.base.Driver`;
:func:`make_driver` picks the one the settings name."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from hpc_dgrab.errors import UserError
from hpc_dgrab.training.drivers.base import Driver, Job

if TYPE_CHECKING:
    from hpc_dgrab.optim.sampler import OrderedSampler

log = logging.getLogger(__name__)

__all__ = ["Driver", "Job", "make_driver"]


def make_driver(job: Job, optimizer: torch.optim.Optimizer, sampler: OrderedSampler) -> Driver:
    """Collective: the driver of ``job.cfg``'s ``--sync`` / ``--gradalign-beta`` / ``--compress``."""
    cfg = job.cfg
    backend = "horovod" if cfg.sync == "horovod" else "mpi"
    if cfg.sync == "gossip":
        from hpc_dgrab.comm.topology import Topology
        from hpc_dgrab.training.drivers.gossip import GossipDriver

        try:
            Topology.from_name(cfg.topology, job.size, seed=cfg.seed)
        except ValueError as exc:
            raise UserError(f"--topology: {exc}", collective=True) from None
        from hpc_dgrab.compress import make_compressor

        return GossipDriver(job, optimizer, cfg.topology,
                            make_compressor(cfg.compress, density=cfg.density, mu=cfg.mu))
    if cfg.gradalign_beta is not None:
        from hpc_dgrab.comm import get_transport
        from hpc_dgrab.training.drivers.gradalign import GradAlignDriver

        return GradAlignDriver(job, optimizer, cfg.gradalign_beta, cfg.local_steps, get_transport(backend))
    from hpc_dgrab.compress import make_compressor
    from hpc_dgrab.training.drivers.sync import SyncDriver

    compression = make_compressor(cfg.compress, density=cfg.density, mu=cfg.mu)
    return SyncDriver(job, optimizer, sampler, compression, backend)
