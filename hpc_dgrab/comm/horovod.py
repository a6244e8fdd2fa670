"""The Horovod transport: :class:`HorovodTransport`, the collectives of ``horovod.torch``.

Implements :class:`~hpc_dgrab.comm.transport.Collectives` (no point-to-point: gossip keeps running
over MPI). Horovod is imported only when this transport is made; ``hvd.init(comm=...)`` shares
mpi4py's communicator (default the world), and a Horovod already initialised on a communicator of
another size is refused. ``close()`` does not shut Horovod down (other code may share it).
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence, Tuple

import torch

from hpc_dgrab import runtime
from hpc_dgrab.comm import transport as _transport
from hpc_dgrab.comm.transport import Handle
from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)


def import_horovod() -> Any:
    """``horovod.torch``, or a one-line ``UserError`` saying how to install it."""
    try:
        import horovod.torch as hvd
    except Exception as exc:  # ImportError, or a broken build raising at load time
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"the horovod backend needs Horovod with PyTorch support ({reason}); "
                        f"install it with 'make horovod'") from None
    return hvd


def horovod_available() -> bool:
    """True when ``horovod.torch`` imports (does not initialise Horovod)."""
    try:
        import horovod.torch  # noqa: F401
    except Exception:
        return False
    return True


class _HorovodHandle:
    """``tensor`` gets the result; Horovod worked on ``work`` (``tensor`` itself, or its contiguous
    copy: Horovod takes contiguous tensors only)."""

    __slots__ = ("_hvd", "_handle", "_tensor", "_work", "_done")

    def __init__(self, hvd: Any, handle: Any, tensor: torch.Tensor, work: torch.Tensor) -> None:
        self._hvd = hvd
        self._handle = handle
        self._tensor = tensor
        self._work = work
        self._done = False

    def test(self) -> bool:
        return self._done or bool(self._hvd.poll(self._handle))

    def wait(self) -> torch.Tensor:
        if not self._done:
            self._hvd.synchronize(self._handle)
            if self._work is not self._tensor:
                self._tensor.copy_(self._work)
            self._done = True
        return self._tensor


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(1) if tensor.dim() == 0 else tensor


class HorovodTransport:
    """Collectives through Horovod's torch ops."""

    def __init__(self, comm: Optional[Any] = None) -> None:
        self.hvd = import_horovod()
        comm = comm if comm is not None else runtime.world()
        if not self.hvd.is_initialized():
            self.hvd.init(comm=comm)
        elif self.hvd.size() != comm.size:
            raise RuntimeError("horovod is already initialised on a different communicator")
        self.rank: int = int(self.hvd.rank())
        self.size: int = int(self.hvd.size())
        self.calls = 0
        self._bytes = 0
        self._closed = False
        _transport.register(self)

    def _count(self, tensor: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("the Horovod transport is closed")
        self.calls += 1
        self._bytes += tensor.nbytes

    @property
    def bytes_sent(self) -> int:
        return self._bytes

    def close(self) -> None:
        self._closed = True

    def allreduce_async_(self, tensor: torch.Tensor, average: bool = False) -> Handle:
        if average and not (tensor.is_floating_point() or tensor.is_complex()):
            raise ValueError(f"average=True needs a floating-point tensor, got {tensor.dtype}")
        self._count(tensor)
        op = self.hvd.Average if average else self.hvd.Sum
        work = tensor if tensor.is_contiguous() else tensor.contiguous()
        return _HorovodHandle(self.hvd, self.hvd.allreduce_async_(work, op=op), tensor, work)

    def allreduce_(self, tensor: torch.Tensor, average: bool = False) -> torch.Tensor:
        return self.allreduce_async_(tensor, average).wait()

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        src = _rows(tensor).contiguous()
        self._count(src)
        return self.hvd.allgather(src)

    def allgatherv(self, tensor: torch.Tensor,
                   counts: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, List[int]]:
        src = _rows(tensor).contiguous()
        self._count(src)
        out = self.hvd.allgather(src)   # Horovod's allgather takes per-rank first dimensions
        if counts is None:
            mine = torch.tensor([src.shape[0]], dtype=torch.int64)
            counts = self.hvd.allgather(mine).tolist()
        return out, [int(c) for c in counts]

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        self._count(tensor)
        if tensor.is_contiguous():
            return self.hvd.broadcast_(tensor, root_rank=root)
        return tensor.copy_(self.hvd.broadcast_(tensor.contiguous(), root_rank=root))

    def __repr__(self) -> str:
        return f"HorovodTransport(rank={self.rank}, size={self.size})"
