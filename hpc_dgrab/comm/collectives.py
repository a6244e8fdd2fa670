"""Synchronous collectives on torch tensors, over mpi4py (default) or Horovod.

One naming scheme (Horovod's): ``op`` returns a new tensor, ``op_`` works in place,
``op_async_`` starts it and returns a :class:`Handle` whose ``wait()`` finishes it (also
``synchronize(handle)`` / ``poll(handle)`` at module level).

Module-level functions use MPI on ``comm`` (default ``MPI.COMM_WORLD``)::

    allreduce_(t, average=True)            # in place, returns t
    h = allreduce_async_(t); ...; h.wait() # overlap with compute
    allgather(t)                           # same shape everywhere -> cat along dim 0
    allgatherv(t)                          # first dims may differ per rank -> cat along dim 0
    broadcast_(t, root=0)

A backend object has the same methods without ``comm`` and is chosen by name, so a trainer does::

    backend = get_backend(args.sync_backend)        # "mpi" or "horovod"
    backend.allreduce_(grad, average=True)

Buffers: a contiguous CPU tensor is handed to MPI through the buffer protocol of
``tensor.numpy()`` (no copy); a non-contiguous one goes through one contiguous temporary. A CUDA
tensor goes straight to MPI when ``runtime.get_runtime().cuda_aware_mpi``, else through one pinned
host buffer (cached per dtype and reused). All ranks must call a collective with the same dtype and
the same shape (``allgatherv``: the same shape after the first dimension). Horovod is imported only
when the ``horovod`` backend is selected.
"""
from __future__ import annotations

import functools
import logging
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from hpc_dgrab import runtime
from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("mpi", "horovod")
#: Other accepted names (the trainer's ``--sync allreduce`` means the MPI backend).
ALIASES = {"allreduce": "mpi"}


# ---------------------------------------------------------------------------- buffers
_PINNED: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}


def _pinned(numel: int, dtype: torch.dtype, slot: Optional[str]) -> torch.Tensor:
    """A pinned host buffer of ``numel`` elements: cached per (slot, dtype) and grown on demand
    for blocking calls; a fresh one when ``slot`` is None (asynchronous calls may overlap)."""
    if slot is None:
        return torch.empty(numel, dtype=dtype, pin_memory=True)
    buf = _PINNED.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype, pin_memory=True)
        _PINNED[(slot, dtype)] = buf
    return buf[:numel]


def _cpu_array(t: torch.Tensor) -> np.ndarray:
    try:
        return t.detach().numpy()
    except TypeError as exc:  # bfloat16 and friends have no numpy type
        raise ValueError(f"MPI collectives do not support dtype {t.dtype}") from exc


class _Staged:
    """An MPI-ready view of a tensor plus the copy-back that puts the result into the tensor.

    ``buf`` is what MPI reads/writes: the tensor's own memory when possible (contiguous CPU
    tensor, or CUDA tensor with CUDA-aware MPI), otherwise one staging buffer.
    """

    def __init__(self, tensor: torch.Tensor, readonly: bool = False,
                 slot: Optional[str] = "inout") -> None:
        self.tensor = tensor
        self._back: Optional[Callable[[], None]] = None
        if tensor.device.type == "cpu":
            if tensor.is_contiguous():
                self.buf: Any = _cpu_array(tensor)
            else:
                tmp = tensor.detach().contiguous()
                self.buf = _cpu_array(tmp)
                if not readonly:
                    self._back = lambda: tensor.detach().copy_(tmp)
        elif tensor.device.type == "cuda":
            if _cuda_aware() and tensor.is_contiguous():
                torch.cuda.current_stream(tensor.device).synchronize()
                self.buf = tensor.detach()
            else:
                host = _pinned(tensor.numel(), tensor.dtype, slot).view(tensor.shape)
                host.copy_(tensor.detach())
                self.buf = _cpu_array(host)
                if not readonly:
                    self._back = lambda: tensor.detach().copy_(host, non_blocking=False)
        else:
            raise ValueError(f"MPI collectives support CPU and CUDA tensors, not {tensor.device}")

    def finish(self) -> torch.Tensor:
        if self._back is not None:
            self._back()
        return self.tensor


_MPI: Any = None
_MPI_TYPES: Dict[torch.dtype, Any] = {}


def _mpi() -> Any:
    """mpi4py's ``MPI`` module, imported once (an import statement per call costs microseconds)."""
    global _MPI
    if _MPI is None:
        from mpi4py import MPI

        _MPI = MPI
        _MPI_TYPES.update({torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE,
                           torch.int32: MPI.INT32_T, torch.int64: MPI.INT64_T,
                           torch.int16: MPI.INT16_T, torch.int8: MPI.INT8_T, torch.uint8: MPI.UINT8_T,
                           torch.complex64: MPI.C_FLOAT_COMPLEX, torch.complex128: MPI.C_DOUBLE_COMPLEX})
    return _MPI


class _BufferSpecs:
    """``[memory, MPI datatype]`` buffer specs of contiguous CPU tensors, cached by (address, bytes,
    dtype). A spec holds only the address (it keeps no tensor alive), so a cached spec is valid for
    whichever tensor occupies that memory now; a full cache is simply cleared."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._specs: Dict[Tuple[int, int, torch.dtype], list] = {}

    def get(self, tensor: torch.Tensor) -> Optional[list]:
        """The spec, or None when the fast path does not apply (dtype without an MPI type, empty)."""
        nbytes = tensor.nbytes
        key = (tensor.data_ptr(), nbytes, tensor.dtype)
        spec = self._specs.get(key)
        if spec is None:
            mpi = _mpi()
            kind = _MPI_TYPES.get(tensor.dtype)
            if kind is None or nbytes == 0:
                return None
            if len(self._specs) >= self.limit:
                self._specs.clear()
            spec = self._specs[key] = [mpi.buffer.fromaddress(key[0], nbytes), kind]
        return spec


def _cuda_aware() -> bool:
    return runtime.get_runtime(set_threads=False).cuda_aware_mpi


def _out_like(tensor: torch.Tensor, shape: Tuple[int, ...]) -> Tuple[torch.Tensor, "_Staged"]:
    """A new output tensor on ``tensor``'s device plus its MPI staging."""
    out = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
    return out, _Staged(out, slot="recv")


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(1) if tensor.dim() == 0 else tensor


def _check_average(tensor: torch.Tensor, average: bool) -> None:
    if average and not (tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(f"average=True needs a floating-point tensor, got {tensor.dtype}")


# ---------------------------------------------------------------------------- handles
class Handle:
    """A started asynchronous collective. ``wait()`` finishes it and returns its tensor."""

    def wait(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def test(self) -> bool:  # pragma: no cover - interface
        """True when the operation has completed (``wait()`` will then return at once)."""
        raise NotImplementedError


class _MPIHandle(Handle):
    __slots__ = ("_request", "_staged", "_average", "_size", "_result")

    def __init__(self, request: Any, staged: Any, average: bool, size: int) -> None:
        self._request = request
        self._staged = staged      # a _Staged, or the tensor itself when MPI works on its memory
        self._average = average
        self._size = size
        self._result: Optional[torch.Tensor] = None

    def test(self) -> bool:
        return self._result is not None or bool(self._request.Test())

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._request.Wait()
            out = self._staged if isinstance(self._staged, torch.Tensor) else self._staged.finish()
            if self._average:
                out.div_(self._size)
            self._result = out
            self._staged = None  # type: ignore[assignment] - drop the staging buffer reference
        return self._result


class _DoneHandle(Handle):
    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def test(self) -> bool:
        return True

    def wait(self) -> torch.Tensor:
        return self._tensor


def synchronize(handle: Handle) -> torch.Tensor:
    """Wait for an asynchronous collective and return its result (Horovod's name)."""
    return handle.wait()


def poll(handle: Handle) -> bool:
    """True when an asynchronous collective has finished (never blocks)."""
    return handle.test()


# ---------------------------------------------------------------------------- backends
class Backend:
    """Synchronous collectives on one communicator. Get one with :func:`get_backend`.

    ``calls`` and ``bytes`` count the operations started and their payload bytes (this rank's
    tensor sizes; for the wire traffic of an algorithm multiply by its factor, e.g. ~2(n-1)/n for a
    ring all-reduce).
    """

    name = "abstract"

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0

    @property
    def rank(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def size(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def _count(self, tensor: torch.Tensor) -> None:
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()

    def allreduce_async_(self, tensor: torch.Tensor, average: bool = False) -> Handle:
        """Start summing (or averaging) ``tensor`` in place across ranks; returns a handle."""
        raise NotImplementedError  # pragma: no cover - interface

    def allreduce_(self, tensor: torch.Tensor, average: bool = False) -> torch.Tensor:
        """Sum (or average) ``tensor`` in place across ranks and return it."""
        return self.allreduce_async_(tensor, average=average).wait()

    def allreduce(self, tensor: torch.Tensor, average: bool = False) -> torch.Tensor:
        """Sum (or average) across ranks into a new tensor (the input is unchanged)."""
        return self.allreduce_(tensor.detach().clone(memory_format=torch.contiguous_format),
                               average=average)

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor (same shape everywhere) along dim 0, in rank order."""
        raise NotImplementedError  # pragma: no cover - interface

    def allgatherv(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate along dim 0 tensors whose first dimension differs per rank (rank order)."""
        raise NotImplementedError  # pragma: no cover - interface

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with ``root``'s, in place; returns it."""
        raise NotImplementedError  # pragma: no cover - interface

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """``root``'s tensor as a new tensor on every rank (the input is unchanged)."""
        return self.broadcast_(tensor.detach().clone(memory_format=torch.contiguous_format), root)

    def stats(self) -> Dict[str, int]:
        return {"calls": self.calls, "bytes": self.bytes}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class MPIBackend(Backend):
    """Collectives with mpi4py's buffer calls on ``comm`` (default ``MPI.COMM_WORLD``)."""

    name = "mpi"

    def __init__(self, comm: Optional[Any] = None) -> None:
        super().__init__()
        self.comm = comm if comm is not None else runtime.world()
        self._specs = _BufferSpecs()
        mpi = _mpi()
        self._size = self.comm.size
        self._allreduce, self._in_place, self._sum = self.comm.Allreduce, mpi.IN_PLACE, mpi.SUM
        # (weakref to the last tensor, its address, its bytes, the bound MPI call on its buffer)
        self._hot: Optional[tuple] = None

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    def allreduce_async_(self, tensor: torch.Tensor, average: bool = False) -> Handle:
        mpi = _MPI or _mpi()
        if average:
            _check_average(tensor, average)
        self.calls += 1
        self.bytes += tensor.nbytes
        if self._size == 1:
            return _DoneHandle(tensor)
        spec = self._specs.get(tensor) if tensor.is_cpu and tensor.is_contiguous() else None
        if spec is not None:
            return _MPIHandle(self.comm.Iallreduce(mpi.IN_PLACE, spec, op=mpi.SUM), tensor, average,
                              self.comm.size)
        staged = _Staged(tensor, slot=None)
        request = self.comm.Iallreduce(mpi.IN_PLACE, staged.buf, op=mpi.SUM)
        return _MPIHandle(request, staged, average, self.comm.size)

    def allreduce_(self, tensor: torch.Tensor, average: bool = False) -> torch.Tensor:
        hot = self._hot
        if hot is not None and hot[0]() is tensor and tensor.data_ptr() == hot[1] and tensor.nbytes == hot[2]:
            # the same tensor object as last time, same memory and size: no re-validation, no new spec,
            # no argument packing (the call is bound once)
            hot[3]()
            self.calls += 1
            self.bytes += hot[2]
            if average:
                tensor.div_(self._size)
            return tensor
        mpi = _MPI or _mpi()
        if average:
            _check_average(tensor, average)
        self.calls += 1
        self.bytes += tensor.nbytes
        if self._size > 1:
            # a contiguous CPU tensor goes to MPI by address (cached spec, no numpy view)
            spec = self._specs.get(tensor) if tensor.is_cpu and tensor.is_contiguous() else None
            if spec is not None:
                self._hot = (weakref.ref(tensor), tensor.data_ptr(), tensor.nbytes,
                             functools.partial(self._allreduce, self._in_place, spec, self._sum))
                self.comm.Allreduce(mpi.IN_PLACE, spec, op=mpi.SUM)
            elif tensor.is_cpu and tensor.is_contiguous():
                self.comm.Allreduce(mpi.IN_PLACE, _cpu_array(tensor), op=mpi.SUM)
            else:
                staged = _Staged(tensor)
                self.comm.Allreduce(mpi.IN_PLACE, staged.buf, op=mpi.SUM)
                staged.finish()
            if average:
                tensor.div_(self._size)
        return tensor

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        src = _rows(tensor)
        self._count(src)
        out, staged_out = _out_like(src, (self.comm.size * src.shape[0],) + tuple(src.shape[1:]))
        self.comm.Allgather(_Staged(src, readonly=True, slot="send").buf, staged_out.buf)
        return staged_out.finish()

    def allgatherv(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.allgatherv_counts(tensor)[0]

    def allgatherv_counts(self, tensor: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """:meth:`allgatherv` plus every rank's first-dimension size."""
        src = _rows(tensor)
        self._count(src)
        rows = np.empty(self.comm.size, dtype=np.int64)
        self.comm.Allgather(np.array([src.shape[0]], dtype=np.int64), rows)
        per_row = int(np.prod(src.shape[1:], dtype=np.int64))
        counts = (rows * per_row).tolist()
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()
        out, staged_out = _out_like(src, (int(rows.sum()),) + tuple(src.shape[1:]))
        send = _Staged(src, readonly=True, slot="send").buf
        self.comm.Allgatherv(send, [staged_out.buf, (counts, displs)])
        return staged_out.finish(), rows.tolist()

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        self._count(tensor)
        if self.comm.size > 1:
            staged = _Staged(tensor)
            self.comm.Bcast(staged.buf, root=root)
            staged.finish()
        return tensor


class _HorovodHandle(Handle):
    def __init__(self, hvd: Any, handle: Any, tensor: torch.Tensor) -> None:
        self._hvd = hvd
        self._handle = handle
        self._tensor = tensor
        self._done = False

    def test(self) -> bool:
        return self._done or bool(self._hvd.poll(self._handle))

    def wait(self) -> torch.Tensor:
        if not self._done:
            self._hvd.synchronize(self._handle)
            self._done = True
        return self._tensor


class HorovodBackend(Backend):
    """Collectives with Horovod's torch ops; ``hvd.init(comm=...)`` shares mpi4py's communicator."""

    name = "horovod"

    def __init__(self, comm: Optional[Any] = None) -> None:
        super().__init__()
        self.hvd = import_horovod()
        self.comm = comm if comm is not None else runtime.world()
        if not self.hvd.is_initialized():
            self.hvd.init(comm=self.comm)
        elif self.hvd.size() != self.comm.size:
            raise RuntimeError("horovod is already initialised on a different communicator")

    @property
    def rank(self) -> int:
        return int(self.hvd.rank())

    @property
    def size(self) -> int:
        return int(self.hvd.size())

    def allreduce_async_(self, tensor: torch.Tensor, average: bool = False) -> Handle:
        _check_average(tensor, average)
        self._count(tensor)
        op = self.hvd.Average if average else self.hvd.Sum
        handle = self.hvd.allreduce_async_(tensor, op=op)
        return _HorovodHandle(self.hvd, handle, tensor)

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        src = _rows(tensor)
        self._count(src)
        return self.hvd.allgather(src)

    def allgatherv(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.allgather(tensor)  # Horovod's allgather already takes per-rank first dims

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        self._count(tensor)
        return self.hvd.broadcast_(tensor, root_rank=root)


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


def get_backend(name: str = "mpi", comm: Optional[Any] = None) -> Backend:
    """The collective backend called ``name`` ("mpi" or "horovod"; "allreduce" = "mpi") on ``comm``
    (default ``MPI.COMM_WORLD``). An unknown name or a missing Horovod is a one-line UserError."""
    name = ALIASES.get(name, name)
    if name == "mpi":
        return MPIBackend(comm)
    if name == "horovod":
        return HorovodBackend(comm)
    raise UserError(f"unknown sync backend {name!r}; choose from: {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------- module-level (MPI)
def allreduce_(tensor: torch.Tensor, average: bool = False, comm: Optional[Any] = None) -> torch.Tensor:
    """Sum (or average) ``tensor`` across ranks in place and return it."""
    return MPIBackend(comm).allreduce_(tensor, average=average)


def allreduce(tensor: torch.Tensor, average: bool = False, comm: Optional[Any] = None) -> torch.Tensor:
    """Sum (or average) across ranks into a new tensor."""
    return MPIBackend(comm).allreduce(tensor, average=average)


def allreduce_async_(tensor: torch.Tensor, average: bool = False, comm: Optional[Any] = None) -> Handle:
    """Start an in-place all-reduce; finish it with ``handle.wait()`` or :func:`synchronize`."""
    return MPIBackend(comm).allreduce_async_(tensor, average=average)


def allgather(tensor: torch.Tensor, comm: Optional[Any] = None) -> torch.Tensor:
    """Every rank's tensor (same shape everywhere) concatenated along dim 0 in rank order."""
    return MPIBackend(comm).allgather(tensor)


def allgatherv(tensor: torch.Tensor, comm: Optional[Any] = None) -> torch.Tensor:
    """Every rank's tensor concatenated along dim 0; first dimensions may differ per rank."""
    return MPIBackend(comm).allgatherv(tensor)


def broadcast_(tensor: torch.Tensor, root: int = 0, comm: Optional[Any] = None) -> torch.Tensor:
    """Overwrite ``tensor`` with ``root``'s on every rank, in place; returns it."""
    return MPIBackend(comm).broadcast_(tensor, root=root)


def broadcast(tensor: torch.Tensor, root: int = 0, comm: Optional[Any] = None) -> torch.Tensor:
    """``root``'s tensor as a new tensor on every rank."""
    return MPIBackend(comm).broadcast(tensor, root=root)
