"""Communication layer: one transport interface, its implementations, topologies, gossip, sparse
all-gather, the wire format.

Imports only :mod:`hpc_dgrab.runtime` and :mod:`hpc_dgrab.errors`; knows no method and no trainer.
Nothing here imports MPI, torch or Horovod; submodules are imported explicitly:

* :mod:`~hpc_dgrab.comm.transport` — the ``Collectives`` / ``PointToPoint`` / ``Transport``
  Protocols, ``close_all()``.
* :mod:`~hpc_dgrab.comm.mpi` — ``MPITransport(comm=None, progress="thread"|"inline"|"nonblocking")``.
* :mod:`~hpc_dgrab.comm.horovod` — ``HorovodTransport(comm=None)`` (collectives only).
* :mod:`~hpc_dgrab.comm.torchdist` — ``TorchTransport(comm=None, backend=None)`` over a
  ``torch.distributed`` process group, gloo or NCCL (collectives only).
* :mod:`~hpc_dgrab.comm.collectives` — Horovod-style module functions (``allreduce_``, ``allgather``,
  ``broadcast_``, ``synchronize``, ``poll``, ...) over a default MPI transport.
* :mod:`~hpc_dgrab.comm.objects` — ``broadcast_object`` / ``allgather_object`` over any transport.
* :mod:`~hpc_dgrab.comm.wire` — the dtype map, ``INT32_LIMIT``, the sparse message size rules.
* :mod:`~hpc_dgrab.comm.sparse` — ``sparse_allgather(indices, values, extra=None, ...) -> Gathered``.
* :mod:`~hpc_dgrab.comm.topology` — graphs and mixing matrices (no MPI).
* :mod:`~hpc_dgrab.comm.gossip` — ``GossipEngine`` (push / poll / close), ``PushSum``.
* ``python -m hpc_dgrab.comm.selftest`` — asynchronous gossip stress check under mpirun.

Here: :func:`get_transport` (a transport by name), :func:`choose_backend` (which one when the
caller names none), :func:`set_default_backend` (what ``hd.init(backend=...)`` calls) and
:func:`horovod_available`.

Backend choice: an explicit name wins ("torch" = NCCL for CUDA tensors when NCCL is available, else
gloo). None = the backend given to ``hd.init(backend=...)``, else NCCL for CUDA tensors when NCCL is
available, else "mpi". ``set_default_backend("gloo"|"nccl"|"torch", comm)`` also makes sure
``torch.distributed``'s default process group exists (from the MPI world, see
:mod:`~hpc_dgrab.comm.torchdist`), so that a DDP model can be built right after ``hd.init``; the
group lives until ``hd.shutdown()`` (or exit).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, Optional

from hpc_dgrab.errors import UserError

if TYPE_CHECKING:
    from hpc_dgrab.comm.transport import Collectives

log = logging.getLogger(__name__)

TRANSPORTS = ("mpi", "horovod", "gloo", "nccl", "torch")
#: other accepted names (the trainer's ``--sync allreduce`` means the MPI transport)
ALIASES = {"allreduce": "mpi"}


def get_transport(name: str = "mpi", comm: Optional[Any] = None, **options: Any) -> Collectives:
    """A new transport called ``name`` on ``comm`` (default the world): "mpi" ("allreduce" is an
    alias), "horovod", "gloo" or "nccl" (``torch.distributed``), "torch" (``torch.distributed`` with
    its default backend: NCCL when CUDA and NCCL are available, else gloo). ``options`` go to its
    constructor (``progress=`` for MPI, ``timeout_s=`` for torch). Collective. An unknown name, a
    missing Horovod or an unusable backend is a one-line :class:`~hpc_dgrab.errors.UserError`."""
    name = ALIASES.get(name, name)
    if name == "mpi":
        from hpc_dgrab.comm.mpi import MPITransport

        return MPITransport(comm, **options)
    if name == "horovod":
        from hpc_dgrab.comm.horovod import HorovodTransport

        return HorovodTransport(comm, **options)
    if name in ("gloo", "nccl", "torch"):
        from hpc_dgrab.comm.torchdist import TorchTransport

        return TorchTransport(comm, backend=None if name == "torch" else name, **options)
    raise UserError(f"unknown sync backend {name!r}; choose from: {', '.join(TRANSPORTS)}")


#: what ``hd.init(backend=...)`` set: the backend name (None: choose per device) and the torch
#: transport that holds the default process group for it
_DEFAULT: Dict[str, Any] = {"backend": None, "holder": None}


def _torch_name(name: str, device: Any) -> str:
    if name != "torch":
        return name
    from hpc_dgrab.comm.torchdist import default_backend

    return default_backend(device)


def choose_backend(backend: Optional[str] = None, device: Any = None) -> str:
    """The transport name for tensors on ``device`` (see the module docstring): ``backend`` when
    given, else ``hd.init(backend=...)``'s, else "nccl" for a CUDA device when NCCL is available,
    else "mpi". Never returns "torch" or an alias; an unknown name is a one-line UserError."""
    name = backend if backend is not None else _DEFAULT["backend"]
    if name is None:
        if device is not None and str(device).startswith("cuda"):
            import torch.distributed as dist

            if dist.is_available() and dist.is_nccl_available():
                return "nccl"
        return "mpi"
    name = ALIASES.get(name, name)
    if name not in TRANSPORTS:
        raise UserError(f"unknown sync backend {name!r}; choose from: {', '.join(TRANSPORTS)}")
    return _torch_name(name, device)


def set_default_backend(backend: Optional[str], comm: Optional[Any] = None) -> None:
    """Record ``backend`` as the default of :func:`choose_backend`; for "gloo", "nccl" and "torch"
    also create ``torch.distributed``'s default process group over ``comm`` if nobody has.
    Collective over ``comm`` when it creates the group."""
    if backend is not None:
        backend = choose_backend(backend)
    holder = _DEFAULT["holder"]
    if holder is not None and (holder.closed or holder.backend != backend):
        holder.close()
        holder = None
    if backend in ("gloo", "nccl") and holder is None:
        from hpc_dgrab.comm.torchdist import TorchTransport

        holder = TorchTransport(comm, backend=backend)
    _DEFAULT.update(backend=backend, holder=holder)
    log.debug("default sync backend: %s", backend or "by device")


def horovod_available() -> bool:
    """True when ``horovod.torch`` imports (does not initialise Horovod)."""
    from hpc_dgrab.comm.horovod import horovod_available as available

    return available()
