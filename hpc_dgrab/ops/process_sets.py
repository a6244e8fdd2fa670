"""Process sets: named groups of ranks that an operation can be restricted to (Horovod's API).

``ProcessSet(ranks)`` describes a group; :func:`add_process_set` registers it (collective: every
rank of the job calls it, in the same order, with the same ranks) and gives it an id and, on its
members, :attr:`ProcessSet.mpi_comm`, an mpi4py communicator over those ranks in rank order
(``None`` on the other ranks). :data:`global_process_set` (id 0) covers every rank and is set up by
``init``. Adding a set whose ranks equal a registered set's, or ranks outside the job, raises
:class:`~hpc_dgrab.ops.exceptions.OpArgumentError` on every rank (the arguments are the same
everywhere). :func:`remove_process_set` (collective too) forgets a set; its communicator is freed
at ``shutdown``. An operation on a set this rank is not in raises ``OpArgumentError`` on this rank.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Union

from hpc_dgrab.ops.exceptions import OpArgumentError

log = logging.getLogger(__name__)


class ProcessSet:
    """A group of global ranks (sorted). ``mpi_comm`` is None until registered and on non-members."""

    def __init__(self, ranks_or_comm: Union[Sequence[int], Any]) -> None:
        self.mpi_comm: Optional[Any] = None
        self.process_set_id: Optional[int] = None
        self._comm_request: Optional[Any] = None
        if hasattr(ranks_or_comm, "Get_group"):   # an mpi4py communicator: its ranks in the world
            self._comm_request = ranks_or_comm
            self.ranks: List[int] = []
        else:
            self.ranks = sorted(int(r) for r in ranks_or_comm)

    def included(self) -> bool:
        """True when this process is a member (after registration)."""
        return self.mpi_comm is not None

    def size(self) -> int:
        """Number of ranks in the set."""
        return len(self.ranks)

    def rank(self) -> int:
        """This process's rank within the set (-1 when not a member)."""
        from hpc_dgrab.ops import engine

        me = engine.current("ProcessSet.rank()").rank
        return self.ranks.index(me) if me in self.ranks else -1

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProcessSet) and other.ranks == self.ranks and \
            other.process_set_id == self.process_set_id

    def __hash__(self) -> int:
        return hash((tuple(self.ranks), self.process_set_id))


#: every rank of the ``init`` communicator (id 0); its ranks are filled in by ``init``
global_process_set = ProcessSet([])
global_process_set.process_set_id = 0

_SETS: Dict[int, ProcessSet] = {}
_RETIRED: List[Any] = []
_NEXT = [1]


def reset(world: Any) -> None:
    """Called by the engine on start: only the global set, over ``world`` (the engine's duplicate)."""
    _SETS.clear()
    _NEXT[0] = 1
    global_process_set.ranks = list(range(world.size))
    global_process_set.mpi_comm = world
    _SETS[0] = global_process_set


def free_all() -> None:
    """Called by the engine at shutdown: free every set's communicator."""
    for ps in list(_SETS.values()) + _RETIRED:
        comm = ps.mpi_comm if isinstance(ps, ProcessSet) else ps
        if comm is not None and ps is not global_process_set:
            comm.Free()
    _RETIRED.clear()
    _SETS.clear()
    global_process_set.mpi_comm = None


def get(process_set: Optional[ProcessSet], rank: int, what: str) -> ProcessSet:
    """The registered set an operation runs on; OpArgumentError if unknown or ``rank`` is not in it."""
    ps = global_process_set if process_set is None else process_set
    if ps.process_set_id is None or _SETS.get(ps.process_set_id) is not ps:
        raise OpArgumentError(f"{what}: process set {ps.ranks} is not registered; call add_process_set first")
    if rank not in ps.ranks:
        raise OpArgumentError(f"{what}: this rank ({rank}) is not in process set "
                              f"{ps.process_set_id} (ranks {ps.ranks})")
    return ps


def add_process_set(process_set: Union[ProcessSet, Sequence[int]]) -> ProcessSet:
    """Collective over every rank: register ``process_set`` (or a list of ranks) and return it."""
    from hpc_dgrab.ops import engine

    eng = engine.current("add_process_set()")
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    if ps._comm_request is not None:
        ps.ranks = sorted(eng.mgmt.allgather(eng.rank if ps._comm_request.rank >= 0 else -1))
        ps.ranks = [r for r in ps.ranks if r >= 0]
    if ps.process_set_id is not None and _SETS.get(ps.process_set_id) is ps:
        raise OpArgumentError(f"add_process_set: process set {ps.ranks} is already registered")
    bad = [r for r in ps.ranks if not 0 <= r < eng.size]
    if bad or not ps.ranks or len(set(ps.ranks)) != len(ps.ranks):
        raise OpArgumentError(f"add_process_set: ranks {ps.ranks} must be distinct ranks of "
                              f"0..{eng.size - 1}")
    if any(other.ranks == ps.ranks for other in _SETS.values()):
        raise OpArgumentError(f"add_process_set: a process set with ranks {ps.ranks} already exists")
    from mpi4py import MPI

    member = eng.rank in ps.ranks
    sub = eng.mgmt.Split(0 if member else MPI.UNDEFINED, key=eng.rank)
    ps.mpi_comm = sub if member else None
    ps.process_set_id = _NEXT[0]
    _NEXT[0] += 1
    _SETS[ps.process_set_id] = ps
    log.debug("process set %d: ranks %s", ps.process_set_id, ps.ranks)
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """Collective over every rank: forget ``process_set``; False if it was not registered (or is
    the global set, which stays)."""
    from hpc_dgrab.ops import engine

    eng = engine.current("remove_process_set()")
    pid = process_set.process_set_id
    if process_set is global_process_set or pid is None or _SETS.get(pid) is not process_set:
        return False
    eng.mgmt.Barrier()          # every rank is done submitting to it before it goes
    del _SETS[pid]
    if process_set.mpi_comm is not None:
        _RETIRED.append(process_set.mpi_comm)
    process_set.mpi_comm = None
    process_set.process_set_id = None
    return True


def by_id(pid: int) -> Optional[ProcessSet]:
    """The registered set with id ``pid`` (None if removed)."""
    return _SETS.get(pid)
