"""Process sets as the training helpers see them (``DistributedOptimizer``, ``SyncBatchNorm``,
``broadcast_object``/``allgather_object``): any object with sorted global ``ranks``, an mpi4py
``mpi_comm`` over them (None on other ranks) and ``included()`` (:class:`ProcessSetLike`, which
``hd.ProcessSet`` satisfies). ``root_rank`` arguments are global ranks, as in Horovod.
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Protocol, runtime_checkable

from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["ProcessSetLike", "process_set_comm", "root_in_set"]


@runtime_checkable
class ProcessSetLike(Protocol):
    """What a process set must offer: its sorted global ranks and an MPI communicator over them
    (None on ranks outside it)."""

    ranks: List[int]
    mpi_comm: Any

    def included(self) -> bool:
        """True on the ranks of the set."""
        ...


def process_set_comm(process_set: Optional[ProcessSetLike], default: Any, what: str) -> Any:
    """The communicator to use: ``default`` without a process set, else the set's (UserError on a
    rank outside it)."""
    if process_set is None:
        return default
    if not isinstance(process_set, ProcessSetLike):
        raise UserError(f"{what}: process_set must be a process set (ranks, mpi_comm, included()), "
                        f"got {type(process_set).__name__}")
    if not process_set.included() or process_set.mpi_comm is None:
        raise UserError(f"{what}: this rank is not in the process set {list(process_set.ranks)}; "
                        "call it on the set's ranks only")
    return process_set.mpi_comm


def root_in_set(process_set: Optional[ProcessSetLike], root_rank: int, what: str) -> int:
    """``root_rank`` (a global rank) as a rank of the set's communicator (UserError if outside)."""
    if process_set is None:
        return int(root_rank)
    ranks = list(process_set.ranks)
    if root_rank not in ranks:
        raise UserError(f"{what}: root_rank {root_rank} is not in the process set {ranks}")
    return ranks.index(root_rank)
