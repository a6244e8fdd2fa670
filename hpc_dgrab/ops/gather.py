"""``allgather``, ``grouped_allgather``, ``broadcast`` and ``alltoall`` with Horovod's arguments.

* ``allgather``: every member's tensor concatenated along the first dimension in rank order; the
  first dimension may differ across ranks, the others must agree.
* ``broadcast``: ``root_rank`` (a global rank, in the process set) sends its tensor to every member.
* ``alltoall(tensor, splits=None)``: ``splits[j]`` first-dimension rows go to member j (default:
  equal parts); returns ``(received, received_splits)`` when ``splits`` is given, as Horovod does,
  else the received tensor only.

The out-of-place forms are differentiable with Horovod's gradients (allgather and broadcast: the
average of the output's gradients, this rank's rows / the root's only; alltoall: the reverse
alltoall). Argument errors (splits that do not fit, non-int32 splits) raise ``OpArgumentError``
on the rank that made them; disagreements across ranks raise ``OpMismatchError`` everywhere.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from hpc_dgrab.ops import engine, process_sets
from hpc_dgrab.ops.allreduce import allreduce, grouped_allreduce
from hpc_dgrab.ops.engine import Handle
from hpc_dgrab.ops.exceptions import OpArgumentError
from hpc_dgrab.ops.reduce_ops import Average
from hpc_dgrab.ops.submit import submit, synchronize, to_device


def _set(process_set: Any, what: str) -> process_sets.ProcessSet:
    return process_sets.get(process_set, engine.current(what).rank, what)


# ---------------------------------------------------------------------------------------- allgather
def grouped_allgather_async(tensors: Sequence[torch.Tensor], name: Optional[str] = None,
                            process_set: Any = None) -> Handle:
    """Start one all-gather of every tensor of ``tensors``; ``synchronize`` gives the list."""
    tensors = list(tensors)
    return submit("allgather", [t.reshape(1) if t.dim() == 0 else t for t in tensors], name, process_set,
                  lambda res: to_device(res, tensors))


def allgather_async(tensor: torch.Tensor, name: Optional[str] = None, process_set: Any = None) -> Handle:
    """Start an all-gather of ``tensor``; ``synchronize`` gives the concatenation."""
    handle = grouped_allgather_async([tensor], name, process_set)
    inner = handle._finish
    handle._finish = lambda res: inner(res)[0]
    return handle


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, name: Optional[str], process_set: Any, *tensors: torch.Tensor) -> Any:
        ctx.dims = [t.shape[0] if t.dim() else 1 for t in tensors]
        ctx.process_set = process_set
        return tuple(synchronize(grouped_allgather_async(tensors, name, process_set)))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        reduced = grouped_allreduce([g.contiguous() for g in grads], op=Average, process_set=ctx.process_set)
        dims = synchronize(grouped_allgather_async([torch.tensor([d], dtype=torch.int64) for d in ctx.dims],
                                                   None, ctx.process_set))
        r = _set(ctx.process_set, "allgather").rank()
        out = [g.narrow(0, int(d[:r].sum()), own) for g, d, own in zip(reduced, dims, ctx.dims)]
        return (None, None) + tuple(out)


def grouped_allgather(tensors: Sequence[torch.Tensor], name: Optional[str] = None,
                      process_set: Any = None) -> List[torch.Tensor]:
    """Collective: for each tensor, every member's copy concatenated along dimension 0."""
    tensors = list(tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return list(_Allgather.apply(name, process_set, *tensors))
    return synchronize(grouped_allgather_async(tensors, name, process_set))


def allgather(tensor: torch.Tensor, name: Optional[str] = None, process_set: Any = None) -> torch.Tensor:
    """Collective: every member's ``tensor`` concatenated along dimension 0 in rank order."""
    return grouped_allgather([tensor], name, process_set)[0]


# ---------------------------------------------------------------------------------------- broadcast
def broadcast_async(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
                    process_set: Any = None) -> Handle:
    """Start a broadcast of ``root_rank``'s ``tensor``; ``synchronize`` gives it as a new tensor."""
    return submit("broadcast", [tensor], name, process_set, lambda res: to_device(res, [tensor])[0],
                  root=int(root_rank))


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
                     process_set: Any = None) -> Handle:
    """In-place :func:`broadcast_async`: ``synchronize`` writes into and returns ``tensor``."""
    def finish(res: List[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            tensor.copy_(res[0])
        return tensor

    return submit("broadcast", [tensor], name, process_set, finish, root=int(root_rank))


def broadcast_(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
               process_set: Any = None) -> torch.Tensor:
    """Collective: overwrite ``tensor`` with ``root_rank``'s, in place; returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, root_rank: int, name: Optional[str], process_set: Any) -> Any:
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return synchronize(broadcast_async(tensor, root_rank, name, process_set))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        reduced = allreduce(grad.contiguous(), op=Average, process_set=ctx.process_set)
        if engine.current("broadcast").rank != ctx.root_rank:
            reduced = reduced * 0
        return reduced, None, None, None


def broadcast(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
              process_set: Any = None) -> torch.Tensor:
    """Collective: ``root_rank``'s ``tensor`` on every member, as a new tensor."""
    if torch.is_grad_enabled() and tensor.requires_grad:
        return _Broadcast.apply(tensor, root_rank, name, process_set)
    return synchronize(broadcast_async(tensor, root_rank, name, process_set))


# ---------------------------------------------------------------------------------------- alltoall
def _splits(tensor: torch.Tensor, splits: Optional[Any], n: int) -> Tuple[int, ...]:
    rows = tensor.shape[0] if tensor.dim() else 1
    if splits is None:
        if rows % n:
            raise OpArgumentError(f"alltoall: the first dimension ({rows}) must be a multiple of the process "
                                  f"set's size ({n}) when splits is not given")
        return tuple([rows // n] * n)
    if isinstance(splits, torch.Tensor):
        if splits.dtype != torch.int32:
            raise OpArgumentError(f"alltoall: splits must hold 32-bit integers, got {splits.dtype}")
        values = [int(v) for v in splits.reshape(-1).tolist()]
    else:
        values = [int(v) for v in splits]
    if len(values) != n or any(v < 0 for v in values) or sum(values) > rows:
        raise OpArgumentError(f"alltoall: splits {values} must be {n} non-negative counts summing to at most "
                              f"the first dimension ({rows})")
    return tuple(values)


def alltoall_async(tensor: torch.Tensor, splits: Optional[Any] = None, name: Optional[str] = None,
                   process_set: Any = None) -> Handle:
    """Start an alltoall; ``synchronize`` gives ``(received, received_splits)``."""
    ps = _set(process_set, "alltoall")
    sp = _splits(tensor, splits, ps.size())

    def finish(res: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        out, recv = res[0]
        return out.to(tensor.device), recv

    return submit("alltoall", [tensor], name, ps, finish, splits=(sp,))


class _Alltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, splits: Any, name: Optional[str], process_set: Any) -> Any:
        out, recv = synchronize(alltoall_async(tensor, splits, name, process_set))
        ctx.recv, ctx.process_set = recv, process_set
        ctx.mark_non_differentiable(recv)
        return out, recv

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> Any:
        out, _recv = synchronize(alltoall_async(grad.contiguous(), ctx.recv, None, ctx.process_set))
        return out, None, None, None


def alltoall(tensor: torch.Tensor, splits: Optional[Any] = None, name: Optional[str] = None,
             process_set: Any = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Collective: rows ``splits[j]`` of ``tensor`` go to member j; returns what arrived (and, when
    ``splits`` is given, how many rows came from each member, as Horovod does)."""
    if torch.is_grad_enabled() and tensor.requires_grad:
        out, recv = _Alltoall.apply(tensor, splits, name, process_set)
    else:
        out, recv = synchronize(alltoall_async(tensor, splits, name, process_set))
    return (out, recv) if splits is not None else out
