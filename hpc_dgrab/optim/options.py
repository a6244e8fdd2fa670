"""``DistributedOptimizer``'s Horovod keywords, checked and resolved into one :class:`SyncOptions`.

* ``op``: ``hd.Average`` (default: the hooks divide each gradient by the number of ranks before
  the sum) or ``hd.Sum`` (no division); ``hd.Adasum`` is a one-line UserError.
* ``gradient_predivide_factor=f`` (Average only): the hooks divide by ``f`` before the sum and the
  sum is multiplied by ``f / size`` after it (Horovod's split of the average).
* ``compression``: None / ``Compression.none`` (dense sums), ``Compression.fp16``/``.bf16`` (dense
  sums in the wire dtype, :class:`~hpc_dgrab.compress.cast.CastReducer`; ``backend="mpi"`` only),
  or a sparse :class:`~hpc_dgrab.compress.Compressor` (TopK, RegTopK).
* ``num_groups=k`` / ``groups=k``: the parameters, in backward order, in ``k`` consecutive groups of
  about equal count, each summed as one message; ``groups=[[p, ...], ...]``: those groups, each one
  message (its parameters must share dtype and device), the other parameters bucketed as usual.
* ``sparse_as_dense``: accepted; sparse gradients are always made dense here (one all-reduce).
* ``process_set``: any object with ``ranks``, ``mpi_comm`` and ``included()``
  (:class:`~hpc_dgrab.sets.ProcessSetLike`, e.g. Horovod-style ``hd.ProcessSet``): the optimizer averages over
  those ranks only; on a rank outside the set it steps on that rank's own gradients (Horovod's
  behaviour).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Union

import torch

from hpc_dgrab.compress import Compressor, GradientExchange
from hpc_dgrab.compress.cast import Cast
from hpc_dgrab.errors import UserError
from hpc_dgrab.ops.reduce_ops import Adasum, Average, Sum
from hpc_dgrab.optim.buckets import bucket_groups
from hpc_dgrab.sets import ProcessSetLike, process_set_comm

log = logging.getLogger(__name__)

__all__ = ["SyncOptions", "check_gradient_op", "compressed_exchange", "plan_groups", "resolve"]

#: the backends whose transport carries the compressed path's sparse all-gather
SPARSE_BACKENDS = ("mpi", "allreduce", "gloo", "nccl", "torch")


def check_gradient_op(op: int, gradient_predivide_factor: float) -> None:
    """Refuse what ``DistributedOptimizer`` cannot do with a one-line UserError: an op other than
    Average or Sum (Adasum is not implemented here), or a predivide factor without Average."""
    if op == Adasum:
        raise UserError("op=Adasum is not supported by hpc_dgrab; use op=hd.Average (the default) or hd.Sum")
    if op not in (Average, Sum):
        raise UserError(f"DistributedOptimizer: op must be hd.Average or hd.Sum, got {op!r}")
    if not gradient_predivide_factor > 0:
        raise UserError(f"gradient_predivide_factor must be > 0, got {gradient_predivide_factor}")
    if gradient_predivide_factor != 1.0 and op != Average:
        raise UserError("gradient_predivide_factor is only valid with op=hd.Average")


@dataclass(frozen=True)
class SyncOptions:
    """The resolved keywords: ``divide`` in the hooks, ``post`` after the sum (1.0: none)."""

    comm: Any
    divide: float
    post: float
    cast: Optional[Cast]
    sparse: Optional[Compressor]


def resolve(compression: Any, op: int, gradient_predivide_factor: float, backend: str,
            process_set: Optional[ProcessSetLike], default_comm: Any) -> SyncOptions:
    """Check the keywords (one-line UserErrors) and resolve them."""
    check_gradient_op(op, float(gradient_predivide_factor))
    if process_set is not None and isinstance(process_set, ProcessSetLike) and not process_set.included():
        from mpi4py import MPI

        comm = MPI.COMM_SELF   # as in Horovod: outside the set, the optimizer steps on local gradients
    else:
        comm = process_set_comm(process_set, default_comm, "DistributedOptimizer")
    size = comm.size
    cast: Optional[Cast] = None
    sparse: Optional[Compressor] = None
    if isinstance(compression, Cast):
        cast = compression if compression.dtype is not None else None
        if cast is not None and backend not in ("mpi", "allreduce"):
            raise UserError(f"compression={cast!r} runs over MPI; use backend='mpi' (got {backend!r})")
    elif isinstance(compression, Compressor):
        sparse = compression
    elif compression is not None:
        raise UserError(f"compression must be hd.Compression.none/fp16/bf16, hd.TopK(...) or "
                        f"hd.RegTopK(...), got {type(compression).__name__}")
    if sparse is not None:   # the sparse exchange averages: op=Sum scales the mean back up
        divide, post = 1.0, (float(size) if op != Average else 1.0)
    elif op == Average:
        f = float(gradient_predivide_factor)
        divide, post = (f, f / size) if f != 1.0 else (float(size), 1.0)
    else:
        divide, post = 1.0, 1.0
    return SyncOptions(comm=comm, divide=divide, post=post, cast=cast, sparse=sparse)


GroupsArg = Union[None, int, Sequence[Iterable[torch.Tensor]]]


def _split_by_kind(group: List[torch.Tensor]) -> List[List[torch.Tensor]]:
    """``group`` in consecutive runs of one (dtype, device) (a bucket holds one kind)."""
    out: List[List[torch.Tensor]] = []
    for p in group:
        if out and (out[-1][0].dtype, out[-1][0].device) == (p.dtype, p.device):
            out[-1].append(p)
        else:
            out.append([p])
    return out


def plan_groups(trainable: List[torch.Tensor], num_groups: int, groups: GroupsArg,
                bucket_cap_mb: float) -> List[List[torch.Tensor]]:
    """The bucket plan (lists of parameters, in the order their sums start)."""
    backward = list(reversed(trainable))
    if isinstance(groups, int):
        num_groups, groups = int(groups), None
    if num_groups < 0:
        raise UserError(f"num_groups must be >= 0, got {num_groups}")
    if groups is None:
        if num_groups == 0 or not backward:
            return bucket_groups(backward, bucket_cap_mb)
        k = min(num_groups, len(backward))
        bounds = [round(i * len(backward) / k) for i in range(k + 1)]
        return [run for lo, hi in zip(bounds[:-1], bounds[1:]) for run in _split_by_kind(backward[lo:hi])]
    position = {id(p): i for i, p in enumerate(backward)}
    given: List[List[torch.Tensor]] = []
    seen = set()
    for g in groups:
        group = list(g)
        for p in group:
            if id(p) not in position:
                raise UserError("groups: every tensor must be a trainable parameter of the optimizer")
            if id(p) in seen:
                raise UserError("groups: a parameter is in more than one group")
            seen.add(id(p))
        if len({(p.dtype, p.device) for p in group}) > 1:
            raise UserError("groups: the parameters of one group must share dtype and device")
        if group:
            given.append(sorted(group, key=lambda p: position[id(p)]))
    rest = bucket_groups([p for p in backward if id(p) not in seen], bucket_cap_mb)
    plan = given + [g for g in rest if g]
    # start order: a group's sum can start when its last parameter (in backward order) has its gradient
    return sorted(plan, key=lambda g: max(position[id(p)] for p in g))


def compressed_exchange(compression: Compressor, backend: str, trainable: List[torch.Tensor],
                        comm: Any) -> GradientExchange:
    """The sparse path's exchange (one all-gather of the whole gradient's selection per step)."""
    if backend not in SPARSE_BACKENDS:
        raise UserError(f"compression runs over the sparse all-gather of the MPI or torch.distributed "
                        f"transports; use backend='mpi', 'gloo' or 'nccl' (got {backend!r})")
    if len({(p.dtype, p.device) for p in trainable}) > 1:
        raise UserError("compression needs every trainable parameter in one dtype on one device")
    from hpc_dgrab.comm import get_transport

    numel = sum(p.numel() for p in trainable)
    return GradientExchange(get_transport(backend, comm), compression, numel or None,
                            dtype=trainable[0].dtype if trainable else None,
                            device=trainable[0].device if trainable else None)
