"""Python objects through any :class:`~hpc_dgrab.comm.transport.Collectives`: pickled into a byte
tensor on the sender, unpickled on the receivers (between the ranks of one job; nothing is read
from disk). Collective: every rank calls with the same ``root``.
"""
from __future__ import annotations

import logging
import pickle
from typing import Any, List

import numpy as np
import torch

from hpc_dgrab.comm.transport import Collectives

log = logging.getLogger(__name__)


def _pack(obj: Any) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(bytearray(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)),
                                          dtype=np.uint8))


def broadcast_object(obj: Any, root: int, transport: Collectives) -> Any:
    """``root``'s ``obj`` on every rank (two broadcasts: the length, then the bytes)."""
    if transport.size == 1:
        return obj
    data = _pack(obj) if transport.rank == root else torch.empty(0, dtype=torch.uint8)
    length = torch.tensor([data.numel()], dtype=torch.int64)
    transport.broadcast_(length, root)
    if transport.rank != root:
        data = torch.empty(int(length.item()), dtype=torch.uint8)
    transport.broadcast_(data, root)
    return obj if transport.rank == root else pickle.loads(data.numpy().tobytes())


def allgather_object(obj: Any, transport: Collectives) -> List[Any]:
    """Every rank's ``obj``, in rank order (one variable-size all-gather)."""
    if transport.size == 1:
        return [obj]
    data, counts = transport.allgatherv(_pack(obj))
    raw = data.numpy().tobytes()
    out, offset = [], 0
    for c in counts:
        out.append(pickle.loads(raw[offset:offset + c]))
        offset += c
    return out
