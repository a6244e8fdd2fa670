"""``allreduce`` and ``grouped_allreduce`` with Horovod's names, arguments and semantics.

``op`` defaults to ``Average`` (``average=`` is Horovod's deprecated spelling); ``prescale_factor``
multiplies before the reduction, ``postscale_factor`` after. ``name`` matches the operation across
ranks (an unnamed one gets this rank's next ``allreduce.noname.N``). ``compression``: any object
with ``compress(tensor) -> (tensor, ctx)`` and ``decompress(tensor, ctx) -> tensor`` (Horovod's
``Compression.none``/``fp16``). The out-of-place forms are differentiable: the gradient is the
same all-reduce of the output's gradient. ``*_async`` return a handle for ``synchronize``/``poll``;
``*_`` write the result into the input.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

from hpc_dgrab.ops import reduce_ops
from hpc_dgrab.ops.engine import Handle
from hpc_dgrab.ops.exceptions import OpArgumentError
from hpc_dgrab.ops.submit import submit, synchronize, to_device


def _fields(op: Optional[int], average: Optional[bool], prescale: float, postscale: float,
            what: str) -> dict:
    return dict(op=reduce_ops.resolve(op, average, what), prescale=float(prescale),
                postscale=float(postscale))


def _check(tensors: Sequence[torch.Tensor], what: str) -> None:
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise OpArgumentError(f"{what} takes tensors, got {type(t).__name__}")


def grouped_allreduce_async(tensors: Sequence[torch.Tensor], average: Optional[bool] = None,
                            name: Optional[str] = None, op: Optional[int] = None,
                            prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: Any = None) -> Handle:
    """Start one all-reduce of every tensor in ``tensors``; ``synchronize`` gives the list of results."""
    tensors = list(tensors)
    _check(tensors, "grouped_allreduce")
    fields = _fields(op, average, prescale_factor, postscale_factor, "grouped_allreduce")
    return submit("allreduce", tensors, name, process_set, lambda res: to_device(res, tensors), **fields)


def allreduce_async(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
                    op: Optional[int] = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                    process_set: Any = None) -> Handle:
    """Start an all-reduce of ``tensor``; ``synchronize(handle)`` gives the result as a new tensor."""
    _check([tensor], "allreduce")
    fields = _fields(op, average, prescale_factor, postscale_factor, "allreduce")
    return submit("allreduce", [tensor], name, process_set, lambda res: to_device(res, [tensor])[0], **fields)


def grouped_allreduce_async_(tensors: Sequence[torch.Tensor], average: Optional[bool] = None,
                             name: Optional[str] = None, op: Optional[int] = None,
                             prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: Any = None) -> Handle:
    """In-place :func:`grouped_allreduce_async`: ``synchronize`` writes into and returns ``tensors``."""
    tensors = list(tensors)
    _check(tensors, "grouped_allreduce_")
    fields = _fields(op, average, prescale_factor, postscale_factor, "grouped_allreduce_")

    def finish(res: List[torch.Tensor]) -> List[torch.Tensor]:
        with torch.no_grad():
            for t, r in zip(tensors, res):
                t.copy_(r)
        return tensors

    return submit("allreduce", tensors, name, process_set, finish, **fields)


def allreduce_async_(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
                     op: Optional[int] = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                     process_set: Any = None) -> Handle:
    """In-place :func:`allreduce_async`: ``synchronize`` writes into and returns ``tensor``."""
    handle = grouped_allreduce_async_([tensor], average, name, op, prescale_factor, postscale_factor,
                                      process_set)
    inner = handle._finish
    handle._finish = lambda res: inner(res)[0]
    return handle


def allreduce_(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
               op: Optional[int] = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
               process_set: Any = None) -> torch.Tensor:
    """Collective: reduce ``tensor`` across ranks in place and return it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor,
                                        process_set))


def grouped_allreduce_(tensors: Sequence[torch.Tensor], average: Optional[bool] = None,
                       name: Optional[str] = None, op: Optional[int] = None, prescale_factor: float = 1.0,
                       postscale_factor: float = 1.0, process_set: Any = None) -> List[torch.Tensor]:
    """Collective: reduce every tensor of ``tensors`` in place; returns ``tensors``."""
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor,
                                                postscale_factor, process_set))


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, op: int, pre: float, post: float, process_set: Any, name: Optional[str],
                *tensors: torch.Tensor) -> Any:
        ctx.args = (op, pre, post, process_set)
        return tuple(synchronize(grouped_allreduce_async(tensors, None, name, op, pre, post, process_set)))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        op, pre, post, process_set = ctx.args
        out = synchronize(grouped_allreduce_async([g.contiguous() for g in grads], None, None, op, pre, post,
                                                  process_set))
        return (None, None, None, None, None) + tuple(out)


def _reduce(tensors: List[torch.Tensor], average: Optional[bool], name: Optional[str], compression: Any,
            op: Optional[int], pre: float, post: float, process_set: Any) -> List[torch.Tensor]:
    _check(tensors, "allreduce")
    op = reduce_ops.resolve(op, average, "allreduce")
    ctxs: List[Any] = []
    if compression is not None:
        packed = [compression.compress(t) for t in tensors]
        tensors, ctxs = [p[0] for p in packed], [p[1] for p in packed]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out = list(_Allreduce.apply(op, pre, post, process_set, name, *tensors))
    else:
        out = synchronize(grouped_allreduce_async(tensors, None, name, op, pre, post, process_set))
    if compression is not None:
        out = [compression.decompress(t, c) for t, c in zip(out, ctxs)]
    return out


def allreduce(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
              compression: Any = None, op: Optional[int] = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, process_set: Any = None) -> torch.Tensor:
    """Collective: ``tensor`` reduced across ranks (``op``, default ``Average``) as a new tensor."""
    return _reduce([tensor], average, name, compression, op, prescale_factor, postscale_factor,
                   process_set)[0]


def grouped_allreduce(tensors: Sequence[torch.Tensor], average: Optional[bool] = None,
                      name: Optional[str] = None, compression: Any = None, op: Optional[int] = None,
                      prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set: Any = None) -> List[torch.Tensor]:
    """Collective: every tensor of ``tensors`` reduced across ranks, as new tensors (one operation)."""
    return _reduce(list(tensors), average, name, compression, op, prescale_factor, postscale_factor,
                   process_set)
