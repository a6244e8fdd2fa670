"""Synchronous collectives on torch tensors.

One naming scheme (Horovod's): ``op`` returns a new tensor, ``op_`` works in place,
``op_async_`` starts it and returns a handle with ``wait()``.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from hpc_dgrab import runtime


def _buffer(tensor: torch.Tensor) -> np.ndarray:
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("allreduce_ needs a contiguous CPU tensor")
    return tensor.detach().numpy()


def allreduce_(tensor: torch.Tensor, average: bool = False, comm: Optional[Any] = None) -> torch.Tensor:
    """Sum (or average) ``tensor`` across ranks in place and return it."""
    from mpi4py import MPI

    comm = comm or runtime.world()
    if comm.size > 1:
        comm.Allreduce(MPI.IN_PLACE, _buffer(tensor), op=MPI.SUM)
    if average:
        tensor.div_(comm.size)
    return tensor


def allreduce(tensor: torch.Tensor, average: bool = False, comm: Optional[Any] = None) -> torch.Tensor:
    """Sum (or average) across ranks into a new tensor."""
    return allreduce_(tensor.detach().clone().contiguous(), average=average, comm=comm)
