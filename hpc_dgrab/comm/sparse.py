"""Sparse all-gather: every rank contributes ``(indices, values)`` plus an optional ``extra`` payload.

Each rank's contribution travels as ONE byte message (one collective of the transport)::

    [ indices: k x int32|int64 ][ values: k x value dtype ][ extra: e x extra dtype ]

Indices are int32 when the caller passes ``numel`` < 2**31 (every rank must pass the same
``numel``), else int64 (:func:`hpc_dgrab.comm.wire.index_dtype`); the size of a message is
:func:`hpc_dgrab.comm.wire.sparse_message_bytes`. ``extra`` (any float tensor, flattened) rides in
the same message: a method's side data (D-GraB's order information, a norm, a counter) piggybacks
on the gradient exchange without a second round trip.

Sizes: with ``same_sizes=True`` the caller promises that every rank has the same ``k`` and the
same extra length (fixed-k Top-k), and the message goes by one ``allgather``. Otherwise one tiny
``allgather`` of each rank's ``(k, e, dtype codes)`` comes first, then ``allgather`` when all
sizes are equal and ``allgatherv`` (with the known sizes) when they differ. Dtypes must agree
across ranks (checked in the second mode, on every rank alike).

Example (Top-k on every rank, then the dense sum)::

    g = sparse_allgather(idx, vals, extra=my_norm.reshape(1), numel=grad.numel())
    dense = g.to_dense(grad.numel(), average=True)      # sum of every rank's sparse vector / n
    g.extras[r]                                          # rank r's extra payload
    g.bytes_sent                                         # this rank's bytes put on the wire

:func:`pack_tensor` / :func:`unpack_tensor` are the pure (MPI-free) halves of the wire format, in
torch on the tensors' device (no host copy of a CUDA tensor on this path; only the optional size
table is read on the host); :func:`pack_message` / :func:`unpack_message` are the same for numpy.
The DDP hooks (:mod:`hpc_dgrab.ddp`) use the same packing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch

from hpc_dgrab.comm import wire
from hpc_dgrab.comm.transport import Collectives

log = logging.getLogger(__name__)

_SIZE_FIELDS = 4  # k, e, value dtype code, extra dtype code
_INT64 = np.dtype(np.int64)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return wire.wire_type(np.dtype(dtype)).torch


def pack_tensor(indices: torch.Tensor, values: torch.Tensor, extra: Optional[torch.Tensor] = None,
                index_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """One rank's message as a 1-D uint8 tensor on ``values``' device (indices, then values, then
    extra; native byte order), packed there: no host copy of a CUDA tensor."""
    parts = [indices.detach().reshape(-1).to(index_dtype), values.detach().reshape(-1)]
    if extra is not None:
        parts.append(extra.detach().reshape(-1).to(values.device))
    # a 1-element tensor may be "contiguous" with stride 0: view needs stride 1 (an empty one: skipped)
    return torch.cat([torch.empty(0, dtype=torch.uint8, device=values.device)]
                     + [(p if p.stride(0) == 1 else p.clone()).view(torch.uint8) for p in parts if p.numel()])


def unpack_tensor(buf: torch.Tensor, k: int, e: int, index_dtype: torch.dtype, value_dtype: torch.dtype,
                  extra_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_tensor`: (indices as int64, values, extra), each a fresh tensor on
    ``buf``'s device."""
    raw = buf.reshape(-1)
    a = k * index_dtype.itemsize
    b = a + k * value_dtype.itemsize
    expected = b + e * extra_dtype.itemsize
    if raw.numel() != expected:
        raise ValueError(f"sparse message has {raw.numel()} bytes, expected {expected}")
    idx = raw[:a].clone().view(index_dtype).to(torch.int64)
    return idx, raw[a:b].clone().view(value_dtype), raw[b:].clone().view(extra_dtype)


def pack_message(indices: np.ndarray, values: np.ndarray, extra: np.ndarray,
                 index_dtype: np.dtype = _INT64) -> np.ndarray:
    """:func:`pack_tensor` of numpy arrays, as a uint8 array."""
    return pack_tensor(torch.from_numpy(np.ascontiguousarray(indices)),
                       torch.from_numpy(np.ascontiguousarray(values)),
                       torch.from_numpy(np.ascontiguousarray(extra)), _torch_dtype(index_dtype)).numpy()


def unpack_message(buf: np.ndarray, k: int, e: int, index_dtype: np.dtype, value_dtype: np.dtype,
                   extra_dtype: np.dtype) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`unpack_tensor` of a numpy message: (indices as int64, values, extra), fresh arrays."""
    raw = torch.from_numpy(np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1))
    out = unpack_tensor(raw, k, e, _torch_dtype(index_dtype), _torch_dtype(value_dtype),
                        _torch_dtype(extra_dtype))
    return out[0].numpy(), out[1].numpy(), out[2].numpy()


@dataclass
class Gathered:
    """Every rank's contribution after :func:`sparse_allgather`, in rank order.

    ``indices[r]`` (int64), ``values[r]`` and ``extras[r]`` (empty when rank r sent none) are 1-D
    tensors on the device of the input values. ``bytes_sent`` counts this rank's bytes put into
    the collectives (its message plus the size exchange, if any); ``message_bytes`` only its
    message; ``bytes_received`` the other ranks' messages.
    """

    indices: List[torch.Tensor]
    values: List[torch.Tensor]
    extras: List[torch.Tensor]
    bytes_sent: int
    message_bytes: int
    bytes_received: int
    numel: Optional[int] = None
    equal_sizes: bool = True
    index_dtype: str = "int64"
    sizes: List[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Number of ranks gathered."""
        return len(self.indices)

    def concat(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """All ranks' (indices, values) concatenated in rank order (duplicates kept)."""
        return torch.cat(self.indices), torch.cat(self.values)

    def to_dense(self, numel: Optional[int] = None, average: bool = False,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sum of every rank's sparse vector as a dense 1-D tensor of ``numel`` (scatter-add).

        Entries chosen by several ranks add up; ``average`` divides by the number of ranks.
        With ``out`` (1-D, ``numel`` elements) the sum is written there (overwriting it).
        """
        numel = numel if numel is not None else self.numel
        if numel is None:
            raise ValueError("to_dense needs numel (not given to sparse_allgather either)")
        idx, val = self.concat()
        if out is None:
            out = torch.zeros(int(numel), dtype=val.dtype, device=val.device)
        else:
            if out.dim() != 1 or out.numel() != numel:
                raise ValueError(f"out must be 1-D with {numel} elements, got {tuple(out.shape)}")
            out.zero_()
        if idx.numel():
            if int(idx.min()) < 0 or int(idx.max()) >= numel:
                raise ValueError(f"sparse index out of range 0..{numel - 1}")
            out.index_add_(0, idx.to(out.device), val.to(out.dtype))
        if average:
            out.div_(self.size)
        return out


def sparse_allgather(indices: torch.Tensor, values: torch.Tensor, extra: Optional[torch.Tensor] = None,
                     *, numel: Optional[int] = None, same_sizes: bool = False,
                     transport: Optional[Collectives] = None) -> Gathered:
    """Gather every rank's ``(indices, values[, extra])``; collective over ``transport`` (default:
    the world's :func:`~hpc_dgrab.comm.collectives.default_transport`).

    ``indices``: integer tensor of k positions (any shape, flattened); ``values``: k floats;
    ``extra``: optional float tensor carried in the same message. ``numel``: the dense length
    (enables int32 indices and a range check). ``same_sizes``: promise that every rank has equal
    k and extra length (skips the size exchange; one all-gather). See the module docstring.
    """
    if transport is None:
        from hpc_dgrab.comm.collectives import default_transport

        transport = default_transport()
    device = values.device
    idx = indices.detach().reshape(-1)
    val = values.detach().reshape(-1)
    vtype = wire.float_type(values.dtype, "sparse_allgather's values")
    etype = vtype if extra is None else wire.float_type(extra.dtype, "sparse_allgather's extra")
    if idx.numel() != val.numel():
        raise ValueError(f"sparse_allgather: {idx.numel()} indices but {val.numel()} values")
    if numel is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise ValueError(f"sparse_allgather: index out of range 0..{numel - 1}")
    index_dtype = wire.index_dtype(numel)
    itype = _torch_dtype(index_dtype)
    k, e = int(idx.numel()), 0 if extra is None else int(extra.numel())
    msg = pack_tensor(idx, val, extra, itype)      # on the values' device
    n = transport.size
    size_bytes = 0
    mine = np.array([k, e, vtype.code, etype.code], dtype=np.int64)
    if same_sizes:
        table = np.tile(mine, (n, 1))
    else:   # sizes only: a tiny table, read on the host
        table = transport.allgather(torch.from_numpy(mine).to(device)).cpu().numpy().reshape(n, _SIZE_FIELDS)
        size_bytes = mine.nbytes
        if (table[:, 2] != table[0, 2]).any() or ((table[:, 1] > 0) & (table[:, 3] != table[0, 3])).any():
            raise ValueError("sparse_allgather: ranks passed different value or extra dtypes")
    ext_dtypes = [wire.from_code(int(c)).numpy for c in table[:, 3]]
    nbytes = [wire.packed_bytes(int(kk), int(ee), index_dtype, vtype.numpy, edt)
              for (kk, ee), edt in zip(table[:, :2], ext_dtypes)]
    equal = len(set(nbytes)) == 1
    if n == 1:
        recv = msg
    elif equal:
        recv = transport.allgather(msg)
    else:
        recv = transport.allgatherv(msg, counts=nbytes)[0]

    out_idx, out_val, out_ext = [], [], []
    offset = 0
    for r in range(n):
        i_r, v_r, e_r = unpack_tensor(recv[offset:offset + nbytes[r]], int(table[r, 0]), int(table[r, 1]),
                                      itype, vtype.torch, _torch_dtype(ext_dtypes[r]))
        offset += nbytes[r]
        out_idx.append(i_r.to(device))
        out_val.append(v_r.to(device))
        out_ext.append(e_r.to(device))
    return Gathered(indices=out_idx, values=out_val, extras=out_ext,
                    bytes_sent=msg.numel() + size_bytes, message_bytes=msg.numel(),
                    bytes_received=int(sum(nbytes) - msg.numel()), numel=numel, equal_sizes=equal,
                    index_dtype=index_dtype.name, sizes=[int(v) for v in table[:, 0]])
