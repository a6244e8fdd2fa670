"""Executing one agreed operation on one rank: the MPI calls over the process set's communicator.

Called by the engine thread only, in the order the coordinator fixed, so every member of the set
runs the same collective calls in the same order. Tensors are CPU tensors here (the caller moves
them); 16-bit floats are reduced in float32 and cast back; ``Average`` of an integer tensor
truncates toward zero. A rank in ``join`` passes ``tensors=None`` and contributes zeros of the
agreed shape to a reduction. Results are new tensors.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch

from hpc_dgrab.ops.negotiation import Request, Response
from hpc_dgrab.ops.reduce_ops import Average, mpi_op

_WIDEN = (torch.float16, torch.bfloat16)


def dtype_of(name: str) -> torch.dtype:
    """``torch.float32`` from ``"float32"``."""
    return getattr(torch, name)


def _bytes(t: torch.Tensor) -> Any:
    """A writable byte view (numpy) of a contiguous CPU tensor."""
    flat = t.reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else flat.to(torch.uint8).numpy()


def _reduce_work(t: torch.Tensor, prescale: float) -> torch.Tensor:
    work = t.to(torch.float32) if t.dtype in _WIDEN else t.clone(memory_format=torch.contiguous_format)
    if work.dtype == torch.bool:
        work = work.to(torch.uint8)
    if prescale != 1.0:
        work = work.mul(prescale).to(work.dtype) if work.is_floating_point() or work.is_complex() \
            else torch.mul(work, prescale).to(work.dtype)
    return work.contiguous()


def _finish(work: torch.Tensor, dtype: torch.dtype, op: int, size: int, postscale: float) -> torch.Tensor:
    if op == Average:
        if work.is_floating_point() or work.is_complex():
            work = work / size
        else:
            work = torch.div(work, size, rounding_mode="trunc")
    if postscale != 1.0:
        work = work.mul(postscale).to(work.dtype)
    return work.to(dtype) if dtype != torch.bool else work != 0


def allreduce(comm: Any, t: torch.Tensor, op: int, prescale: float, postscale: float) -> torch.Tensor:
    """``t`` reduced over ``comm`` (a new tensor)."""
    from mpi4py import MPI

    work = _reduce_work(t, prescale)
    if work.numel():
        comm.Allreduce(MPI.IN_PLACE, work.reshape(-1).numpy(), op=mpi_op(op))
    return _finish(work, t.dtype, op, comm.size, postscale).reshape(t.shape)


def scatter_counts(rows: int, size: int) -> List[int]:
    """Rows of a reducescatter result per member: ``rows // size``, one more for the first
    ``rows % size`` members."""
    return [rows // size + (1 if i < rows % size else 0) for i in range(size)]


def reducescatter(comm: Any, t: torch.Tensor, op: int, prescale: float, postscale: float) -> torch.Tensor:
    """This member's block of rows of ``t`` reduced over ``comm``."""
    counts = scatter_counts(t.shape[0], comm.size)
    row = math.prod(t.shape[1:])
    work = _reduce_work(t, prescale)
    out = torch.empty((counts[comm.rank],) + tuple(t.shape[1:]), dtype=work.dtype)
    if work.numel():
        comm.Reduce_scatter(work.reshape(-1).numpy(), out.reshape(-1).numpy(),
                            recvcounts=[c * row for c in counts], op=mpi_op(op))
    return _finish(out, t.dtype, op, comm.size, postscale)


def allgather(comm: Any, t: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Every member's ``t`` (``rows[i]`` first-dimension rows from member i) concatenated."""
    src = t.reshape(1) if t.dim() == 0 else t.contiguous()
    row_bytes = math.prod(src.shape[1:]) * src.element_size()
    out = torch.empty((sum(rows),) + tuple(src.shape[1:]), dtype=src.dtype)
    counts = [r * row_bytes for r in rows]
    comm.Allgatherv(_bytes(src), [_bytes(out), counts])
    return out


def broadcast(comm: Any, t: torch.Tensor, root: int) -> torch.Tensor:
    """``root``'s (rank within ``comm``) ``t`` on every member."""
    out = t.clone(memory_format=torch.contiguous_format)
    if out.numel():
        comm.Bcast(_bytes(out), root=root)
    return out


def alltoall(comm: Any, t: torch.Tensor,
             matrix: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows ``matrix[i][j]`` go from member i to member j; returns (received rows, received splits)."""
    me = comm.rank
    src = t.contiguous()
    row_bytes = math.prod(src.shape[1:]) * src.element_size()
    recv_rows = [matrix[i][me] for i in range(comm.size)]
    out = torch.empty((sum(recv_rows),) + tuple(src.shape[1:]), dtype=src.dtype)
    send_counts = [r * row_bytes for r in matrix[me]]
    recv_counts = [r * row_bytes for r in recv_rows]
    comm.Alltoallv([_bytes(src), send_counts], [_bytes(out), recv_counts])
    return out, torch.tensor(recv_rows, dtype=torch.int32)


def run(resp: Response, comm: Any, mine: Optional[Request], tensors: Optional[List[torch.Tensor]]) -> Any:
    """Execute ``resp`` on this rank: a list of results (alltoall: of (tensor, splits) pairs)."""
    template = mine if mine is not None else next(iter(resp.requests.values()))
    if tensors is None:   # a joined rank fills in zeros
        tensors = [torch.zeros(s, dtype=dtype_of(d)) for s, d in zip(template.shapes, template.dtypes)]
    members = template.members
    out: List[Any] = []
    for i, t in enumerate(tensors):
        if resp.kind == "allreduce":
            out.append(allreduce(comm, t, template.op, template.prescale, template.postscale))
        elif resp.kind == "reducescatter":
            out.append(reducescatter(comm, t, template.op, template.prescale, template.postscale))
        elif resp.kind == "allgather":
            rows = [resp.requests[m].shapes[i][0] if resp.requests[m].shapes[i] else 1 for m in members]
            out.append(allgather(comm, t, rows))
        elif resp.kind == "broadcast":
            out.append(broadcast(comm, t, members.index(template.root)))
        elif resp.kind == "alltoall":
            matrix = [resp.requests[m].splits[i] for m in members]
            out.append(alltoall(comm, t, matrix))
        else:
            raise ValueError(f"unknown operation kind {resp.kind!r}")
    return out
