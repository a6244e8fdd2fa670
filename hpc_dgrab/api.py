"""Process-level state of the public API: ``init``, ``rank``/``size``, and the broadcasts.

Shaped like Horovod's so a user's script changes little::

    import hpc_dgrab as hd
    hd.init()                                     # MPI.COMM_WORLD, or init(comm=sub_communicator)
    model = Net().to(device)
    hd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    hd.broadcast_optimizer_state(opt, root_rank=0)

``init(comm=None)`` records the communicator every later call uses (mpi4py communicator, default
the world); it is the only call here that touches MPI before a collective is asked for. Calling
``rank()``, ``size()``, a broadcast or building a ``DistributedOptimizer`` before ``init()`` is a
one-line :class:`~hpc_dgrab.errors.UserError`. ``local_rank()``/``local_size()`` are this process's
place among the ranks of ``comm`` on the same node (a shared-memory split, done once in ``init``).

The broadcasts are collective over the ``init`` communicator; every rank must call them in the same
order. ``broadcast_parameters`` first checks that every rank holds the same names, shapes and
dtypes (one small all-gather) and raises the same one-line UserError on every rank otherwise, so a
mismatch never hangs or truncates. Everything goes through the ``init`` communicator's transport
(:func:`transport`): tensors as raw buffers, one broadcast per dtype; Python objects
(``broadcast_object``, the optimizer's hyperparameters) pickled between the ranks of this job
(nothing is ever unpickled from disk). :func:`shutdown` closes every transport.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from hpc_dgrab import lifecycle, runtime
from hpc_dgrab.errors import UserError

if TYPE_CHECKING:
    from hpc_dgrab.comm.transport import Collectives

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """What ``init`` recorded: the communicator and this process's place in it."""

    comm: Any
    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int = 0
    cross_size: int = 1


_CONTEXT: Optional[Context] = None

NOT_INITIALISED = "hpc_dgrab.init() has not been called; call it first (before {what})"


def init(comm: Optional[Any] = None, process_sets: Optional[Any] = None,
         backend: Optional[str] = None) -> None:
    """Initialise the API on ``comm`` (an mpi4py communicator; default ``MPI.COMM_WORLD``) and start
    the operations engine (:mod:`hpc_dgrab.ops.engine`). ``process_sets``: Horovod's argument, a
    list of ``ProcessSet`` (or rank lists) to register now (``"dynamic"`` is accepted: sets can
    always be added later with ``add_process_set``). ``backend``: the default of
    ``DistributedOptimizer(backend=None)`` (:func:`hpc_dgrab.comm.choose_backend`; "gloo"/"nccl" make
    torch.distributed's default group from this communicator).

    Collective over ``comm`` on every call: every rank of ``comm`` must call it, and each call does
    the same collective work whatever this rank's earlier calls were (a rank-local "already
    initialised on this communicator" shortcut would skip the collective on some ranks only, e.g.
    after an ``init(sub_communicator)`` that only some ranks took part in, and hang the others).
    Idempotent on the same communicator; a second ``init`` with another communicator replaces it.
    """
    global _CONTEXT
    if comm is None:
        comm = runtime.world()
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    local_rank, local_size = local.rank, local.size
    local.Free()
    lifecycle.install(comm)  # one rank's uncaught exception or early exit ends the whole job
    from hpc_dgrab.comm import set_default_backend

    set_default_backend(backend, comm)
    cross = comm.Split(local_rank, key=comm.rank)
    cross_rank, cross_size = cross.rank, cross.size
    cross.Free()
    if _CONTEXT is None or _CONTEXT.comm is not comm:
        _CONTEXT = Context(comm=comm, rank=comm.rank, size=comm.size, local_rank=local_rank,
                           local_size=local_size, cross_rank=cross_rank, cross_size=cross_size)
        from hpc_dgrab.ops import engine

        engine.start(comm)
        log.debug("hpc_dgrab.init: rank %d of %d (local %d of %d)", comm.rank, comm.size, local_rank,
                  local_size)
    _register_process_sets(process_sets)


def _register_process_sets(sets: Optional[Any]) -> None:
    """Register ``init``'s ``process_sets`` that are not registered yet (collective)."""
    if sets is None or isinstance(sets, str):
        return
    from hpc_dgrab.ops import process_sets as ps

    for s in sets:
        registered = isinstance(s, ps.ProcessSet) and s.process_set_id is not None and \
            ps.by_id(s.process_set_id) is s
        if not registered:
            ps.add_process_set(s)


def transport(what: str = "using hpc_dgrab") -> Collectives:
    """The transport of the :func:`init` communicator (an MPI transport, made on first use)."""
    from hpc_dgrab.comm.collectives import default_transport

    return default_transport(context(what).comm)


def is_initialized() -> bool:
    """True after :func:`init`."""
    return _CONTEXT is not None


def context(what: str = "using hpc_dgrab") -> Context:
    """The :func:`init` state, or a one-line UserError naming ``what`` needed it."""
    if _CONTEXT is None:
        raise UserError(NOT_INITIALISED.format(what=what))
    return _CONTEXT


def rank() -> int:
    """This process's rank in the ``init`` communicator."""
    return context("hpc_dgrab.rank()").rank


def size() -> int:
    """Number of ranks in the ``init`` communicator."""
    return context("hpc_dgrab.size()").size


def local_rank() -> int:
    """This process's rank among the ranks of the same node."""
    return context("hpc_dgrab.local_rank()").local_rank


def local_size() -> int:
    """Number of ranks on this node."""
    return context("hpc_dgrab.local_size()").local_size


def cross_rank() -> int:
    """This process's rank among the ranks with the same local rank (one per node, in rank order)."""
    return context("hpc_dgrab.cross_rank()").cross_rank


def cross_size() -> int:
    """Number of ranks with this process's local rank (the number of nodes, when they are alike)."""
    return context("hpc_dgrab.cross_size()").cross_size


def shutdown() -> None:
    """Stop the operations engine (collective: it ends once every rank has asked), close every live
    transport (their threads end, their duplicated communicators are freed) and forget :func:`init`;
    a later call needs ``init()`` again. Does not finalise MPI."""
    global _CONTEXT
    from hpc_dgrab.comm.transport import close_all
    from hpc_dgrab.ops import engine

    engine.stop()
    closed = close_all()
    _CONTEXT = None
    log.debug("hpc_dgrab.shutdown: %d transport(s) closed", closed)


# ------------------------------------------------------------------------------------------ checks
def signature_digest(items: Sequence[Tuple[str, Tuple[int, ...], str]]) -> str:
    """A short hex digest of a list of (name, shape, dtype)."""
    text = ";".join(f"{n}:{'x'.join(map(str, s))}:{d}" for n, s, d in items)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_everywhere(items: Sequence[Tuple[str, Tuple[int, ...], str]], what: str, comm: Any) -> None:
    """Collective: raise the same one-line UserError on every rank unless every rank passes the same
    ``items`` (name, shape, dtype). One all-gather of (digest, count, items' first difference)."""
    from hpc_dgrab.comm.collectives import default_transport
    from hpc_dgrab.comm.objects import allgather_object

    t = default_transport(comm)
    mine = (signature_digest(items), len(items))
    gathered = allgather_object(mine, t)
    if all(g == gathered[0] for g in gathered):
        return
    bad = next(r for r, g in enumerate(gathered) if g != gathered[0])
    # tell everyone which entry differs: rank 0's and rank `bad`'s lists, compared on every rank
    lists = allgather_object(list(items) if t.rank in (0, bad) else None, t)
    a, b = lists[0], lists[bad]
    detail = f"rank 0 has {len(a)}, rank {bad} has {len(b)}"
    for x, y in zip(a, b):
        if x != y:
            detail = (f"rank 0 has {x[0]} {tuple(x[1])} {x[2]}, rank {bad} has {y[0]} {tuple(y[1])} {y[2]}")
            break
    raise UserError(f"{what} differ across ranks ({detail}); every rank must build the same model",
                    collective=True)


def _describe(name: str, t: torch.Tensor) -> Tuple[str, Tuple[int, ...], str]:
    return (name, tuple(t.shape), str(t.dtype).replace("torch.", ""))


# ------------------------------------------------------------------------------------------ broadcasts
Params = Union[Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]], Iterable[torch.Tensor]]


def _named(params: Params) -> List[Tuple[str, torch.Tensor]]:
    if isinstance(params, Mapping):
        return sorted(params.items())
    out = []
    for i, item in enumerate(params):
        if isinstance(item, tuple) and len(item) == 2:
            out.append((str(item[0]), item[1]))
        elif isinstance(item, torch.Tensor):
            out.append((f"param.{i}", item))
        else:
            raise UserError(f"broadcast_parameters takes a state_dict(), named_parameters() or a list of "
                            f"tensors, got an item of type {type(item).__name__}")
    return out


def broadcast_tensors_(tensors: Sequence[torch.Tensor], root_rank: int, comm: Any) -> None:
    """Overwrite ``tensors`` with ``root_rank``'s in place: one broadcast per (dtype, device) group."""
    from hpc_dgrab.comm.collectives import default_transport

    transport_ = default_transport(comm)
    groups: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for ts in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in ts]) if len(ts) > 1 else \
                ts[0].detach().reshape(-1).clone()
            transport_.broadcast_(flat, root_rank)
            offset = 0
            for t in ts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def broadcast_parameters(params: Params, root_rank: int = 0) -> None:
    """Collective: copy ``root_rank``'s parameters (and buffers, given a ``state_dict()``) into every
    rank's tensors in place. ``params``: ``model.state_dict()``, ``model.named_parameters()`` or a list
    of tensors. Different names/shapes/dtypes across ranks: the same one-line UserError everywhere."""
    ctx = context("broadcast_parameters()")
    named = _named(params)
    check_same_everywhere([_describe(n, t) for n, t in named], "parameters passed to broadcast_parameters",
                          ctx.comm)
    if ctx.size > 1:
        broadcast_tensors_([t for _, t in named], root_rank, ctx.comm)


def broadcast_object(obj: Any, root_rank: int = 0, name: Optional[str] = None,
                     process_set: Any = None) -> Any:
    """Collective: ``root_rank``'s ``obj`` on every rank (of ``process_set``; ``root_rank`` is a
    global rank), pickled between this job's ranks. ``name`` is accepted (Horovod's) and unused."""
    from hpc_dgrab.comm.collectives import default_transport
    from hpc_dgrab.comm.objects import broadcast_object as _broadcast_object
    from hpc_dgrab.sets import process_set_comm, root_in_set

    comm = process_set_comm(process_set, context("broadcast_object()").comm, "broadcast_object")
    return _broadcast_object(obj, root_in_set(process_set, root_rank, "broadcast_object"),
                             default_transport(comm))


def allgather_object(obj: Any, name: Optional[str] = None, process_set: Any = None) -> List[Any]:
    """Collective: every rank's ``obj`` (of ``process_set``), in rank order, pickled between this
    job's ranks. ``name`` is accepted (Horovod's) and unused."""
    from hpc_dgrab.comm.collectives import default_transport
    from hpc_dgrab.comm.objects import allgather_object as _allgather_object
    from hpc_dgrab.sets import process_set_comm

    comm = process_set_comm(process_set, context("allgather_object()").comm, "allgather_object")
    return _allgather_object(obj, default_transport(comm))


def _split_tensors(obj: Any, out: List[torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by a placeholder ``("__tensor__", i, shape, dtype)``."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return ("__tensor__", len(out) - 1, tuple(obj.shape), str(obj.dtype).replace("torch.", ""))
    if isinstance(obj, dict):
        return {k: _split_tensors(v, out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split_tensors(v, out) for v in obj)
    return obj


def _join_tensors(obj: Any, tensors: Sequence[torch.Tensor]) -> Any:
    if isinstance(obj, tuple) and len(obj) == 4 and obj[0] == "__tensor__":
        return tensors[obj[1]]
    if isinstance(obj, dict):
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join_tensors(v, tensors) for v in obj)
    return obj


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0,
                              model: Any = None) -> None:
    """Collective: load ``root_rank``'s optimizer state (momentum buffers, step counts and the
    param groups' hyperparameters) into every rank's ``optimizer``. Works before the first step too
    (then only the hyperparameters travel). A ``DistributedOptimizer``'s per-rank compression memory
    is not broadcast (it is this rank's own). ``model`` (Horovod's keyword) is accepted, not needed."""
    ctx = context("broadcast_optimizer_state()")
    if ctx.size == 1:
        return
    tensors: List[torch.Tensor] = []
    skeleton = None
    if ctx.rank == root_rank:
        skeleton = _split_tensors(torch.optim.Optimizer.state_dict(optimizer), tensors)
        skeleton = (skeleton, [(tuple(t.shape), t.dtype) for t in tensors])
    skeleton, meta = broadcast_object(skeleton, root_rank)
    if ctx.rank != root_rank:
        tensors = [torch.empty(shape, dtype=dtype) for shape, dtype in meta]
    else:
        tensors = [t.detach().cpu().clone() for t in tensors]
    if tensors:
        broadcast_tensors_(tensors, root_rank, ctx.comm)
    if ctx.rank != root_rank:
        torch.optim.Optimizer.load_state_dict(optimizer, _join_tensors(skeleton, tensors))
