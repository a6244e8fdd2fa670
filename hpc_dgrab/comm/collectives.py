"""Horovod-style collectives as module functions, over one default MPI transport per communicator.

One naming scheme (Horovod's): ``op`` returns a new tensor, ``op_`` works in place, ``op_async_``
starts it and returns a handle whose ``wait()`` finishes it (also ``synchronize(handle)`` /
``poll(handle)``)::

    allreduce_(t, average=True)            # in place, returns t (sum by default)
    h = allreduce_async_(t); ...; synchronize(h)
    allgather(t)                           # same shape everywhere -> cat along dim 0
    allgatherv(t)                          # first dims may differ per rank -> cat along dim 0
    broadcast_(t, root=0)

Each function is collective over ``comm`` (default ``MPI.COMM_WORLD``) and runs on
:func:`default_transport` of that communicator: an :class:`~hpc_dgrab.comm.mpi.MPITransport` with
``progress="nonblocking"``, made on first use (collectively) and kept while the communicator
object lives (or until :func:`hpc_dgrab.comm.transport.close_all`).
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Dict, Optional, Tuple

import torch

from hpc_dgrab import runtime
from hpc_dgrab.comm.mpi import MPITransport
from hpc_dgrab.comm.transport import Handle

log = logging.getLogger(__name__)

_DEFAULT: Dict[int, Tuple[weakref.ref[Any], MPITransport]] = {}


def _forget(key: int) -> None:
    entry = _DEFAULT.pop(key, None)
    if entry is not None:
        entry[1].close()


def default_transport(comm: Optional[Any] = None) -> MPITransport:
    """The module functions' transport on ``comm`` (default the world); collective when it is made."""
    comm = comm if comm is not None else runtime.world()
    key = id(comm)
    entry = _DEFAULT.get(key)
    if entry is not None and entry[0]() is comm and not entry[1].closed:
        return entry[1]
    transport = MPITransport(comm, progress="nonblocking")
    _DEFAULT[key] = (weakref.ref(comm, lambda _: _forget(key)), transport)
    return transport


def synchronize(handle: Handle) -> torch.Tensor:
    """Wait for an asynchronous collective and return its result (Horovod's name)."""
    return handle.wait()


def poll(handle: Handle) -> bool:
    """True when an asynchronous collective has finished (never blocks)."""
    return handle.test()


def allreduce_(tensor: torch.Tensor, average: bool = False, comm: Optional[Any] = None) -> torch.Tensor:
    """Sum (or average) ``tensor`` across ranks in place and return it."""
    return default_transport(comm).allreduce_(tensor, average=average)


def allreduce(tensor: torch.Tensor, average: bool = False, comm: Optional[Any] = None) -> torch.Tensor:
    """Sum (or average) across ranks into a new tensor (the input is unchanged)."""
    return allreduce_(tensor.detach().clone(memory_format=torch.contiguous_format), average, comm)


def allreduce_async_(tensor: torch.Tensor, average: bool = False, comm: Optional[Any] = None) -> Handle:
    """Start an in-place all-reduce; finish it with ``handle.wait()`` or :func:`synchronize`."""
    return default_transport(comm).allreduce_async_(tensor, average=average)


def allgather(tensor: torch.Tensor, comm: Optional[Any] = None) -> torch.Tensor:
    """Every rank's tensor (same shape everywhere) concatenated along dim 0 in rank order."""
    return default_transport(comm).allgather(tensor)


def allgatherv(tensor: torch.Tensor, comm: Optional[Any] = None) -> torch.Tensor:
    """Every rank's tensor concatenated along dim 0; first dimensions may differ per rank."""
    return default_transport(comm).allgatherv(tensor)[0]


def broadcast_(tensor: torch.Tensor, root: int = 0, comm: Optional[Any] = None) -> torch.Tensor:
    """Overwrite ``tensor`` with ``root``'s on every rank, in place; returns it."""
    return default_transport(comm).broadcast_(tensor, root=root)


def broadcast(tensor: torch.Tensor, root: int = 0, comm: Optional[Any] = None) -> torch.Tensor:
    """``root``'s tensor as a new tensor on every rank (the input is unchanged)."""
    return broadcast_(tensor.detach().clone(memory_format=torch.contiguous_format), root, comm)
