"""The sparse message packed in torch (hpc_dgrab.comm.sparse.pack_tensor/unpack_tensor): round trip,
sizes, and the tensors torch calls contiguous that a dtype view refuses (an expanded scalar, empty)."""
import pytest
import torch

from hpc_dgrab.comm import wire
from hpc_dgrab.comm.sparse import pack_tensor, unpack_tensor


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("value_dtype", [torch.float16, torch.float32, torch.float64])
def test_round_trip_and_size(index_dtype, value_dtype):
    idx = torch.tensor([7, 0, 4096])
    val = torch.tensor([1.5, -2.0, 3.25], dtype=value_dtype)
    ext = torch.tensor([10.0, 20.0], dtype=torch.float64)
    msg = pack_tensor(idx, val, ext, index_dtype)
    assert msg.dtype == torch.uint8 and msg.numel() == wire.packed_bytes(
        3, 2, wire.numpy_dtype(index_dtype), wire.numpy_dtype(value_dtype), wire.numpy_dtype(torch.float64))
    i, v, e = unpack_tensor(msg, 3, 2, index_dtype, value_dtype, torch.float64)
    assert torch.equal(i, idx) and i.dtype == torch.int64 and torch.equal(v, val) and torch.equal(e, ext)


def test_an_expanded_scalar_and_empty_parts_pack():
    one = torch.tensor([5.0]).expand(1)                    # "contiguous", stride 0
    msg = pack_tensor(torch.tensor([3]).expand(1), one, torch.empty(0), torch.int32)
    i, v, e = unpack_tensor(msg, 1, 0, torch.int32, torch.float32, torch.float32)
    assert i.tolist() == [3] and v.tolist() == [5.0] and e.numel() == 0
    empty = pack_tensor(torch.empty(0, dtype=torch.int64), torch.empty(0), None)
    assert empty.numel() == 0 and [t.numel() for t in unpack_tensor(empty, 0, 0, torch.int64, torch.float32,
                                                                     torch.float32)] == [0, 0, 0]


def test_a_wrong_size_is_refused():
    msg = pack_tensor(torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="sparse message has 11 bytes, expected 12"):
        unpack_tensor(msg[:-1], 1, 0, torch.int64, torch.float32, torch.float32)
