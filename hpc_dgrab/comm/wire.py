"""The wire: the one dtype map (torch <-> numpy <-> MPI <-> message code) and the size rules.

* Every dtype a transport moves has one :class:`WireType`: its torch and numpy dtypes, the name of
  its MPI datatype and the small integer ``code`` that messages carry (the sparse size exchange).
  Codes are stable (0 float32, 1 float64, 2 float16, then the integers and complex types).
* Indices of a sparse message go as int32 when the dense length is known and at most
  :data:`INT32_LIMIT`, else as int64 (:func:`index_dtype`).
* A sparse message is ``[k indices][k values][extra]`` with no header: its size is
  :func:`sparse_message_bytes` (torch dtypes) / :func:`packed_bytes` (numpy dtypes).

Pure: imports neither MPI nor anything above :mod:`hpc_dgrab.errors`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

log = logging.getLogger(__name__)

#: the largest index an int32 holds (and the largest element count of one MPI message count)
INT32_LIMIT = 2 ** 31 - 1


@dataclass(frozen=True)
class WireType:
    """One dtype as every layer of the wire names it."""

    code: int
    torch: torch.dtype
    numpy: np.dtype
    mpi_name: Optional[str]    # None: MPI does not reduce it (float16 travels as bytes only)

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def floating(self) -> bool:
        return self.torch.is_floating_point


#: in code order (index == code); never reorder: codes travel in messages
TYPES: Tuple[WireType, ...] = tuple(WireType(i, t, np.dtype(n), m) for i, (t, n, m) in enumerate([
    (torch.float32, np.float32, "FLOAT"), (torch.float64, np.float64, "DOUBLE"),
    (torch.float16, np.float16, None),
    (torch.int32, np.int32, "INT32_T"), (torch.int64, np.int64, "INT64_T"),
    (torch.int16, np.int16, "INT16_T"), (torch.int8, np.int8, "INT8_T"), (torch.uint8, np.uint8, "UINT8_T"),
    (torch.complex64, np.complex64, "C_FLOAT_COMPLEX"), (torch.complex128, np.complex128, "C_DOUBLE_COMPLEX"),
]))
#: the dtypes a sparse message's values and extra may have (gossip's too)
FLOAT_CODES = (0, 1, 2)
_BY_TORCH: Dict[torch.dtype, WireType] = {w.torch: w for w in TYPES}
_BY_NUMPY: Dict[np.dtype, WireType] = {w.numpy: w for w in TYPES}

DType = Union[torch.dtype, np.dtype, type]


def wire_type(dtype: DType) -> WireType:
    """The :class:`WireType` of a torch or numpy dtype; ValueError when the wire does not carry it."""
    found = _BY_TORCH.get(dtype) if isinstance(dtype, torch.dtype) else _BY_NUMPY.get(np.dtype(dtype))
    if found is None:
        raise ValueError(f"dtype {dtype} cannot go on the wire (supported: "
                         f"{', '.join(str(w.torch).replace('torch.', '') for w in TYPES)})")
    return found


def float_type(dtype: DType, what: str) -> WireType:
    """:func:`wire_type` of a float16/32/64 dtype; ValueError naming ``what`` otherwise."""
    try:
        w = wire_type(dtype)
    except ValueError:
        w = None
    if w is None or w.code not in FLOAT_CODES:
        raise ValueError(f"{what} needs float16/32/64, got {dtype}")
    return w


def from_code(code: int) -> WireType:
    """The :class:`WireType` a message's dtype code names."""
    if not 0 <= code < len(TYPES):
        raise ValueError(f"unknown wire dtype code {code}")
    return TYPES[code]


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype the wire carries."""
    return wire_type(dtype).numpy


def mpi_type(dtype: torch.dtype, mpi: Any) -> Optional[Any]:
    """The MPI datatype of a torch dtype from mpi4py's ``MPI`` module, or None when MPI cannot
    *reduce* it (float16: it is then staged, never summed by MPI)."""
    w = _BY_TORCH.get(dtype)
    return None if w is None or w.mpi_name is None else getattr(mpi, w.mpi_name)


def index_dtype(numel: Optional[int]) -> np.dtype:
    """int32 when the dense length ``numel`` is known and fits :data:`INT32_LIMIT`, else int64."""
    return np.dtype(np.int32 if numel is not None and numel <= INT32_LIMIT else np.int64)


def packed_bytes(k: int, e: int, index: np.dtype, value: np.dtype, extra: np.dtype) -> int:
    """Bytes of one packed sparse message: ``k`` indices and values, ``e`` extra elements."""
    return k * (np.dtype(index).itemsize + np.dtype(value).itemsize) + e * np.dtype(extra).itemsize


def sparse_message_bytes(k: int, numel: int, value_dtype: torch.dtype, extra_numel: int = 0,
                         extra_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of one rank's sparse message: ``k`` indices (int32 when ``numel`` fits, see
    :func:`index_dtype`), ``k`` values of ``value_dtype`` and ``extra_numel`` elements of
    ``extra_dtype`` (default ``value_dtype``)."""
    value = wire_type(value_dtype).numpy
    extra = wire_type(extra_dtype if extra_dtype is not None else value_dtype).numpy
    return packed_bytes(k, extra_numel, index_dtype(numel), value, extra)
