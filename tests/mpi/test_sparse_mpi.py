"""Sparse all-gather with piggybacked extra payload; serial wire-format tests + MPI tests (-n 4)."""
import numpy as np
import pytest
import torch

from hpc_dgrab.comm import wire
from hpc_dgrab.comm.collectives import default_transport
from hpc_dgrab.comm.sparse import pack_message, sparse_allgather, unpack_message


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _transport():
    return default_transport(_world())


def _all_true(flag):
    return all(_world().allgather(bool(flag)))


def _contribution(rank, k, numel, extra_len=0, dtype=torch.float32):
    """Deterministic per-rank sparse vector: distinct indices, integer-valued floats."""
    rng = np.random.default_rng(100 + rank)
    idx = np.sort(rng.choice(numel, size=k, replace=False)).astype(np.int64)
    val = (rng.integers(-50, 50, size=k)).astype(np.float64)
    ext = np.arange(extra_len, dtype=np.float64) + 1000 * rank
    return (torch.from_numpy(idx), torch.from_numpy(val).to(dtype),
            torch.from_numpy(ext).to(dtype) if extra_len else None)


def _dense_reference(contribs, numel):
    out = np.zeros(numel)
    for idx, val, _ in contribs:
        np.add.at(out, idx.numpy(), val.double().numpy())
    return out


# ------------------------------------------------------------------ serial: wire format
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_pack_unpack_round_trip(index_dtype):
    idx = np.array([3, 0, 7], dtype=np.int64)
    val = np.array([1.5, -2.0, 4.25], dtype=np.float32)
    ext = np.array([9.0, 8.0], dtype=np.float64)
    buf = pack_message(idx, val, ext, np.dtype(index_dtype))
    assert buf.dtype == np.uint8
    assert buf.nbytes == wire.packed_bytes(3, 2, index_dtype, np.float32, np.float64) \
        == 3 * (np.dtype(index_dtype).itemsize + 4) + 2 * 8
    i2, v2, e2 = unpack_message(buf, 3, 2, index_dtype, np.float32, np.float64)
    assert i2.dtype == np.int64 and np.array_equal(i2, idx)
    assert np.array_equal(v2, val) and v2.dtype == np.float32 and np.array_equal(e2, ext)
    with pytest.raises(ValueError, match="expected"):
        unpack_message(buf[:-1], 3, 2, index_dtype, np.float32, np.float64)


@pytest.mark.parametrize("numel", [6, wire.INT32_LIMIT, wire.INT32_LIMIT + 1])
@pytest.mark.parametrize("value_dtype, extra_dtype", [(torch.float32, None), (torch.float16, torch.float64),
                                                      (torch.float64, torch.float32)])
def test_wire_size_rule_is_the_packed_message_size(numel, value_dtype, extra_dtype):
    k, e = 5, 3
    idx = np.arange(k, dtype=np.int64) * 2
    val = np.ones(k, dtype=wire.numpy_dtype(value_dtype))
    ext = np.ones(e, dtype=wire.numpy_dtype(extra_dtype or value_dtype))
    buf = pack_message(idx, val, ext, wire.index_dtype(numel))
    assert buf.nbytes == wire.sparse_message_bytes(k, numel, value_dtype, e, extra_dtype)
    assert wire.index_dtype(numel) == (np.int32 if numel <= wire.INT32_LIMIT else np.int64)


def test_single_rank_gather_and_dense_without_mpi_peers():
    from mpi4py import MPI

    idx, val, ext = torch.tensor([4, 1, 4]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([7.0])
    g = sparse_allgather(idx, val, ext, numel=6, transport=default_transport(MPI.COMM_SELF))
    assert g.size == 1 and g.index_dtype == "int32" and g.message_bytes == 3 * 8 + 4
    assert torch.equal(g.to_dense(), torch.tensor([0, 2.0, 0, 0, 4.0, 0]))
    assert torch.equal(g.extras[0], ext)
    assert g.message_bytes == wire.sparse_message_bytes(3, 6, torch.float32, 1)
    with pytest.raises(ValueError, match="out of range"):
        sparse_allgather(idx, val, numel=3, transport=default_transport(MPI.COMM_SELF))


# ------------------------------------------------------------------ MPI
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("same_sizes", [False, True])
def test_equal_k_with_extra_matches_numpy(same_sizes):
    comm = _world()
    numel, k = 1000, 25
    contribs = [_contribution(r, k, numel, extra_len=3) for r in range(comm.size)]
    idx, val, ext = contribs[comm.rank]
    g = sparse_allgather(idx, val, ext, numel=numel, same_sizes=same_sizes, transport=_transport())
    dense = g.to_dense(average=False)
    ref = _dense_reference(contribs, numel)
    ok = (g.equal_sizes and g.size == comm.size and dense.dtype == torch.float32
          and np.array_equal(dense.double().numpy(), ref)
          and np.allclose(g.to_dense(numel, average=True).double().numpy(), ref / comm.size, atol=1e-6)
          and all(torch.equal(g.indices[r], contribs[r][0]) and torch.equal(g.values[r], contribs[r][1])
                  and torch.equal(g.extras[r], contribs[r][2]) for r in range(comm.size))
          and g.message_bytes == k * (4 + 4) + 3 * 4
          and g.bytes_sent == g.message_bytes + (0 if same_sizes else 32)
          and g.bytes_received == (comm.size - 1) * g.message_bytes)
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_varying_k_uses_allgatherv_and_matches_numpy():
    comm = _world()
    numel = 5000
    ks = [(7 * r) % 11 for r in range(comm.size)]          # rank 0 sends nothing
    extra_lens = [r % 2 for r in range(comm.size)]         # some ranks carry no extra
    contribs = [_contribution(r, ks[r], numel, extra_len=extra_lens[r], dtype=torch.float64)
                for r in range(comm.size)]
    idx, val, ext = contribs[comm.rank]
    g = sparse_allgather(idx, val, ext, numel=numel, transport=_transport())
    out = torch.full((numel,), 99.0, dtype=torch.float64)
    g.to_dense(out=out)
    ok = (not g.equal_sizes and g.sizes == ks
          and np.array_equal(out.numpy(), _dense_reference(contribs, numel))
          and all(g.extras[r].numel() == extra_lens[r] for r in range(comm.size))
          and all(torch.equal(g.extras[r], contribs[r][2]) for r in range(comm.size) if extra_lens[r])
          and g.values[0].dtype == torch.float64)
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_overlapping_indices_add_and_int64_without_numel():
    comm = _world()
    idx = torch.tensor([0, 5, 2 ** 33 + comm.rank])       # beyond int32: needs int64 on the wire
    val = torch.tensor([1.0, float(comm.rank), 2.0])
    g = sparse_allgather(idx, val, transport=_transport())
    all_idx, all_val = g.concat()
    small = sparse_allgather(idx[:2], val[:2], transport=_transport()).to_dense(6)
    ref = np.zeros(6)
    ref[0] = comm.size
    ref[5] = sum(range(comm.size))
    ok = (g.index_dtype == "int64" and g.message_bytes == 3 * (8 + 4)
          and sorted(all_idx.tolist()) == sorted([0, 5] * comm.size + [2 ** 33 + r for r in range(comm.size)])
          and float(all_val.sum()) == comm.size * 3 + sum(range(comm.size))
          and np.array_equal(small.numpy(), ref))
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_mismatched_dtypes_raise_on_every_rank():
    comm = _world()
    dtype = torch.float64 if comm.rank == 0 else torch.float32
    with pytest.raises(ValueError, match="different value or extra dtypes"):
        sparse_allgather(torch.tensor([1]), torch.tensor([1.0], dtype=dtype), transport=_transport())
