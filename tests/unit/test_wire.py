"""The wire's one dtype map and size rules (no MPI)."""
import numpy as np
import pytest
import torch

from hpc_dgrab.comm import wire


def test_codes_are_stable_and_round_trip():
    assert [w.torch for w in wire.TYPES[:3]] == [torch.float32, torch.float64, torch.float16]
    for w in wire.TYPES:
        assert wire.from_code(w.code) is w
        assert wire.wire_type(w.torch) is w and wire.wire_type(w.numpy) is w
        assert wire.numpy_dtype(w.torch) == np.dtype(torch.empty(0, dtype=w.torch).numpy().dtype)
        assert w.itemsize == torch.empty(0, dtype=w.torch).element_size()
    with pytest.raises(ValueError, match="unknown wire dtype code"):
        wire.from_code(len(wire.TYPES))


def test_unsupported_and_non_float_dtypes_are_refused():
    with pytest.raises(ValueError, match="cannot go on the wire"):
        wire.wire_type(torch.bfloat16)
    with pytest.raises(ValueError, match="gossip needs float16/32/64"):
        wire.float_type(torch.int64, "gossip")
    assert wire.float_type(np.float16, "x").code == 2


def test_mpi_types_and_the_size_rules():
    from mpi4py import MPI

    assert wire.mpi_type(torch.float32, MPI) == MPI.FLOAT and wire.mpi_type(torch.int64, MPI) == MPI.INT64_T
    assert wire.mpi_type(torch.float16, MPI) is None and wire.mpi_type(torch.bfloat16, MPI) is None
    assert wire.INT32_LIMIT == 2 ** 31 - 1
    assert wire.index_dtype(None) == np.int64 and wire.index_dtype(10) == np.int32
    assert wire.sparse_message_bytes(10, 100, torch.float32) == 10 * (4 + 4)
    assert wire.sparse_message_bytes(10, 2 ** 31, torch.float64, 3, torch.float16) == 10 * 16 + 6
    assert wire.sparse_message_bytes(0, 5, torch.float32, 4) == 16
