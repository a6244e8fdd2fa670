"""Buffers MPI can read and write for torch tensors (used by :mod:`hpc_dgrab.comm.mpi`).

* A contiguous CPU tensor goes to MPI by address: :class:`BufferSpecs` caches its
  ``[memory, MPI datatype]`` spec by (address, bytes, dtype), so a hot tensor costs no numpy view.
* :class:`Staged` is an MPI-ready view of any tensor plus the copy-back of the result: the tensor's
  own memory when possible (contiguous CPU; contiguous CUDA with CUDA-aware MPI), else ONE
  temporary: a contiguous copy (CPU) or a pinned host buffer (CUDA) from a :class:`PinnedBuffers`.
* :class:`PinnedBuffers` caches one pinned host buffer per (slot, dtype), grown on demand, for
  blocking calls; asynchronous calls (slot None) get a fresh one (they may overlap).

A :class:`PinnedBuffers` and a :class:`BufferSpecs` are used by one thread at a time.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from hpc_dgrab import runtime
from hpc_dgrab.comm import wire

log = logging.getLogger(__name__)

_MPI: Any = None


def mpi() -> Any:
    """mpi4py's ``MPI`` module, imported once (an import statement per call costs microseconds)."""
    global _MPI
    if _MPI is None:
        from mpi4py import MPI

        _MPI = MPI
    return _MPI


def cpu_array(t: torch.Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor; ValueError for dtypes numpy lacks (bfloat16, ...)."""
    try:
        return t.detach().numpy()
    except TypeError as exc:
        raise ValueError(f"MPI collectives do not support dtype {t.dtype}") from exc


def cuda_aware() -> bool:
    return runtime.get_runtime(set_threads=False).cuda_aware_mpi


class PinnedBuffers:
    """Pinned host buffers for staging CUDA tensors (see the module docstring)."""

    def __init__(self) -> None:
        self._cache: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, slot: Optional[str]) -> torch.Tensor:
        if slot is None:
            return torch.empty(numel, dtype=dtype, pin_memory=True)
        buf = self._cache.get((slot, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, pin_memory=True)
            self._cache[(slot, dtype)] = buf
        return buf[:numel]


class Staged:
    """An MPI-ready buffer ``buf`` for ``tensor`` and :meth:`finish`, which copies the result back."""

    __slots__ = ("tensor", "buf", "_back")

    def __init__(self, tensor: torch.Tensor, pinned: PinnedBuffers, readonly: bool = False,
                 slot: Optional[str] = "inout") -> None:
        self.tensor = tensor
        self._back: Optional[Callable[[], Any]] = None
        self.buf: Any
        if tensor.device.type == "cpu":
            if tensor.is_contiguous():
                self.buf = cpu_array(tensor)
            else:
                tmp = tensor.detach().contiguous()
                self.buf = cpu_array(tmp)
                if not readonly:
                    self._back = lambda: tensor.detach().copy_(tmp)
        elif tensor.device.type == "cuda":
            if cuda_aware() and tensor.is_contiguous():
                torch.cuda.current_stream(tensor.device).synchronize()
                self.buf = tensor.detach()
            else:
                host = pinned.get(tensor.numel(), tensor.dtype, slot).view(tensor.shape)
                host.copy_(tensor.detach())
                self.buf = cpu_array(host)
                if not readonly:
                    self._back = lambda: tensor.detach().copy_(host, non_blocking=False)
        else:
            raise ValueError(f"MPI collectives support CPU and CUDA tensors, not {tensor.device}")

    def finish(self) -> torch.Tensor:
        """Copy the result into the tensor (when MPI worked on a temporary); return the tensor."""
        if self._back is not None:
            self._back()
        return self.tensor


class BufferSpecs:
    """``[memory, MPI datatype]`` buffer specs of contiguous CPU tensors, cached by (address, bytes,
    dtype). A spec holds only the address (it keeps no tensor alive), so a cached spec is valid for
    whichever tensor occupies that memory now; a full cache is simply cleared."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._specs: Dict[Tuple[int, int, torch.dtype], List[Any]] = {}

    def get(self, tensor: torch.Tensor) -> Optional[List[Any]]:
        """The spec, or None when the fast path does not apply (no MPI reduction type, empty)."""
        nbytes = tensor.nbytes
        key = (tensor.data_ptr(), nbytes, tensor.dtype)
        spec = self._specs.get(key)
        if spec is None:
            MPI = mpi()
            kind = wire.mpi_type(tensor.dtype, MPI)
            if kind is None or nbytes == 0:
                return None
            if len(self._specs) >= self.limit:
                self._specs.clear()
            spec = self._specs[key] = [MPI.buffer.fromaddress(key[0], nbytes), kind]
        return spec
