"""``reducescatter`` and ``grouped_reducescatter`` with Horovod's arguments and semantics.

The tensor (same shape on every member, at least one dimension) is reduced across the process set
with ``op`` (default ``Average``) and split along the first dimension: member i keeps
``rows // n`` rows, one more when ``i < rows % n``. Differentiable with Horovod's gradient (the
all-gather of the output's gradient, times the set's size for ``Sum`` and times the scale factors).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

from hpc_dgrab.ops import reduce_ops
from hpc_dgrab.ops.engine import Handle
from hpc_dgrab.ops.exceptions import OpArgumentError
from hpc_dgrab.ops.gather import _set, grouped_allgather
from hpc_dgrab.ops.reduce_ops import Average, Sum
from hpc_dgrab.ops.submit import submit, synchronize, to_device


def grouped_reducescatter_async(tensors: Sequence[torch.Tensor], name: Optional[str] = None,
                                op: int = Average, process_set: Any = None, prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> Handle:
    """Start one reduce-scatter of every tensor of ``tensors``; ``synchronize`` gives the list."""
    tensors = list(tensors)
    for t in tensors:
        if t.dim() == 0:
            raise OpArgumentError("reducescatter: tensors need at least one dimension, got a scalar")
    op = reduce_ops.resolve(op, None, "reducescatter")
    return submit("reducescatter", tensors, name, process_set, lambda res: to_device(res, tensors), op=op,
                  prescale=float(prescale_factor), postscale=float(postscale_factor))


def reducescatter_async(tensor: torch.Tensor, name: Optional[str] = None, op: int = Average,
                        process_set: Any = None, prescale_factor: float = 1.0,
                        postscale_factor: float = 1.0) -> Handle:
    """Start a reduce-scatter of ``tensor``; ``synchronize`` gives this member's rows."""
    handle = grouped_reducescatter_async([tensor], name, op, process_set, prescale_factor, postscale_factor)
    inner = handle._finish
    handle._finish = lambda res: inner(res)[0]
    return handle


class _Reducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, name: Optional[str], op: int, process_set: Any, pre: float, post: float,
                *tensors: torch.Tensor) -> Any:
        ctx.args = (op, process_set, pre, post)
        return tuple(synchronize(grouped_reducescatter_async(tensors, name, op, process_set, pre, post)))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        op, process_set, pre, post = ctx.args
        scale = (_set(process_set, "reducescatter").size() if op == Sum else 1) * pre * post
        gathered = grouped_allgather([(g * scale if scale != 1 else g).contiguous() for g in grads],
                                     process_set=process_set)
        return (None, None, None, None, None) + tuple(gathered)


def grouped_reducescatter(tensors: Sequence[torch.Tensor], name: Optional[str] = None,
                          compression: Any = None, op: int = Average, process_set: Any = None,
                          prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> List[torch.Tensor]:
    """Collective: each tensor reduced across the set, this member's block of rows of each."""
    tensors = list(tensors)
    ctxs: List[Any] = []
    if compression is not None:
        packed = [compression.compress(t) for t in tensors]
        tensors, ctxs = [p[0] for p in packed], [p[1] for p in packed]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out = list(_Reducescatter.apply(name, op, process_set, float(prescale_factor),
                                        float(postscale_factor), *tensors))
    else:
        out = synchronize(grouped_reducescatter_async(tensors, name, op, process_set, prescale_factor,
                                                      postscale_factor))
    if compression is not None:
        out = [compression.decompress(t, c) for t, c in zip(out, ctxs)]
    return out


def reducescatter(tensor: torch.Tensor, name: Optional[str] = None, compression: Any = None,
                  op: int = Average, process_set: Any = None, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """Collective: ``tensor`` reduced across the set; this member's block of rows, as a new tensor."""
    return grouped_reducescatter([tensor], name, compression, op, process_set, prescale_factor,
                                 postscale_factor)[0]
