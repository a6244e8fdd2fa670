"""``sparse_allreduce_async``: Horovod's all-reduce of a sparse COO tensor, by all-gathering its
indices and values (duplicates are summed when the result is coalesced or made dense).

Returns a callable (as Horovod does) that waits and gives the reduced sparse tensor; ``op`` is
``Average`` (values divided by the set's size) or ``Sum``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from hpc_dgrab.ops.gather import _set, allgather_async
from hpc_dgrab.ops.reduce_ops import Average, resolve
from hpc_dgrab.ops.submit import synchronize


def sparse_allreduce_async(tensor: torch.Tensor, name: Optional[str] = None, op: Optional[int] = None,
                           process_set: Any = None) -> Callable[[], torch.Tensor]:
    """Start the all-reduce of a sparse ``tensor``; call the result to wait for it."""
    op = resolve(op, None, "sparse_allreduce_async")
    size = _set(process_set, "sparse_allreduce_async").size()
    t = tensor.coalesce() if not tensor.is_coalesced() else tensor
    indices = allgather_async(t.indices().transpose(0, 1).contiguous(),
                              name=f"{name}.indices" if name is not None else None, process_set=process_set)
    values = allgather_async(t.values(), name=f"{name}.values" if name is not None else None,
                             process_set=process_set)

    def finish() -> torch.Tensor:
        v = synchronize(values)
        i = synchronize(indices)
        if op == Average:
            v = v / size
        return torch.sparse_coo_tensor(i.transpose(0, 1), v, t.size())

    return finish
