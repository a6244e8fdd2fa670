"""Collectives (module functions, MPI, Horovod and torch/gloo transports) against numpy references;
run under mpirun -n 4.

Every rank computes, the results are gathered, and every rank asserts (no assert before a
collective the others wait in).
"""
import sys

import numpy as np
import pytest
import torch

from hpc_dgrab.comm import collectives as C
from hpc_dgrab.comm import get_transport, horovod_available
from hpc_dgrab.comm.horovod import import_horovod
from hpc_dgrab.comm.mpi import MPITransport
from hpc_dgrab.errors import UserError


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _rank_data(rank, shape, dtype=torch.float32):
    """Integer-valued data (sums are exact in float) that differs per rank."""
    n = int(np.prod(shape))
    return (torch.arange(n, dtype=torch.float64) * (rank + 1) + rank).to(dtype).reshape(shape)


def _all_true(flag):
    return all(_world().allgather(bool(flag)))


# ------------------------------------------------------------------ serial checks
def test_horovod_missing_gives_one_line_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod.torch", None)   # makes `import horovod.torch` fail
    with pytest.raises(UserError, match="make horovod") as err:
        import_horovod()
    assert "\n" not in str(err.value)


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match="choose from: mpi, horovod, gloo, nccl, torch"):
        get_transport("carrier-pigeon")


def test_allreduce_alias_is_the_mpi_transport():
    from mpi4py import MPI

    backend = get_transport("allreduce", MPI.COMM_SELF)
    t = torch.tensor([1.0, 2.0])
    assert isinstance(backend, MPITransport) and backend.allreduce_(t, average=True) is t
    assert torch.equal(t, torch.tensor([1.0, 2.0])) and (backend.calls, backend.bytes_sent) == (1, 8)
    backend.close()


# ------------------------------------------------------------------ MPI backend
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_allreduce_in_place_matches_numpy(dtype):
    comm = _world()
    t = _rank_data(comm.rank, (3, 5), dtype)
    ptr = t.data_ptr()
    out = C.allreduce_(t, comm=comm)
    ref = sum(_rank_data(r, (3, 5), torch.float64).numpy() for r in range(comm.size))
    assert _all_true(out is t and t.data_ptr() == ptr
                     and np.array_equal(t.numpy(), ref.astype(t.numpy().dtype)))


@pytest.mark.mpi(min_size=2)
def test_allreduce_average_new_tensor_and_noncontiguous():
    comm = _world()
    base = _rank_data(comm.rank, (4, 6))
    ref = sum(_rank_data(r, (4, 6), torch.float64).numpy() for r in range(comm.size))
    new = C.allreduce(base, average=True, comm=comm)
    unchanged = np.array_equal(base.numpy(), _rank_data(comm.rank, (4, 6)).numpy())
    view = _rank_data(comm.rank, (6, 4)).t()             # non-contiguous, reduced in place
    assert not view.is_contiguous()
    C.default_transport(comm).allreduce_(view)
    ok = (unchanged and np.allclose(new.numpy(), ref / comm.size, rtol=0, atol=1e-6)
          and np.array_equal(view.numpy(), sum(_rank_data(r, (6, 4), torch.float64).numpy()
                                                 for r in range(comm.size)).T))
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_allreduce_async_handles():
    comm = _world()
    backend = get_transport("mpi", comm, progress="nonblocking")
    tensors = [_rank_data(comm.rank, (100,)) + k for k in range(3)]
    handles = [backend.allreduce_async_(t, average=(k == 1)) for k, t in enumerate(tensors)]
    first = C.synchronize(handles[0])
    for h in handles[1:]:
        h.wait()
    polled = all(C.poll(h) for h in handles)
    refs = [sum(_rank_data(r, (100,), torch.float64).numpy() + k for r in range(comm.size))
            for k in range(3)]
    refs[1] = refs[1] / comm.size
    ok = polled and first is tensors[0] and all(np.allclose(t.numpy(), r, rtol=0, atol=1e-5)
                                                for t, r in zip(tensors, refs))
    assert _all_true(ok)
    assert (backend.calls, backend.bytes_sent) == (3, 3 * 100 * 4)
    backend.close()


@pytest.mark.mpi(min_size=2)
def test_allgather_and_allgatherv_match_numpy():
    comm = _world()
    t = _rank_data(comm.rank, (2, 3))
    g = C.allgather(t, comm=comm)
    ref = np.concatenate([_rank_data(r, (2, 3)).numpy() for r in range(comm.size)])
    rows = [r % 3 for r in range(comm.size)]             # includes a rank sending zero rows
    v = C.allgatherv(_rank_data(comm.rank, (rows[comm.rank], 4), torch.float64), comm=comm)
    refv = np.concatenate([_rank_data(r, (rows[r], 4), torch.float64).numpy() for r in range(comm.size)])
    out, counts = C.default_transport(comm).allgatherv(torch.full((comm.rank + 1,), float(comm.rank)))
    refc = np.concatenate([np.full(r + 1, float(r)) for r in range(comm.size)])
    scalar = C.allgather(torch.tensor(float(comm.rank)), comm=comm)
    ok = (tuple(g.shape) == (2 * comm.size, 3) and np.array_equal(g.numpy(), ref)
          and np.array_equal(v.numpy(), refv) and v.dtype == torch.float64
          and counts == list(range(1, comm.size + 1)) and np.array_equal(out.numpy(), refc)
          and np.array_equal(scalar.numpy(), np.arange(comm.size, dtype=np.float32)))
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_broadcast_in_place_and_new():
    comm = _world()
    root = comm.size - 1
    t = _rank_data(comm.rank, (5,))
    C.broadcast_(t, root=root, comm=comm)
    src = _rank_data(comm.rank, (3,), torch.int64)
    new = C.broadcast(src, root=0, comm=comm)
    ok = (np.array_equal(t.numpy(), _rank_data(root, (5,)).numpy())
          and np.array_equal(new.numpy(), _rank_data(0, (3,), torch.int64).numpy())
          and np.array_equal(src.numpy(), _rank_data(comm.rank, (3,), torch.int64).numpy()))
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_average_of_integer_tensor_refused_on_every_rank():
    with pytest.raises(ValueError, match="floating-point"):
        C.allreduce_(torch.ones(3, dtype=torch.int32), average=True, comm=_world())


# ------------------------------------------------------------------ Horovod and torch/gloo backends
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ["horovod", "gloo"])
def test_other_transports_match_the_mpi_transport(name):
    if name == "horovod" and not horovod_available():
        pytest.skip("horovod.torch does not import here (build it: make horovod)")
    comm = _world()
    other = get_transport(name, comm)
    mpi = get_transport("mpi", comm)
    a = _rank_data(comm.rank, (7, 3))
    b = a.clone()
    other.allreduce_(a, average=True)
    mpi.allreduce_(b, average=True)
    s = _rank_data(comm.rank, (11,))
    h = other.allreduce_async_(s)
    C.synchronize(h)
    ref_s = sum(_rank_data(r, (11,), torch.float64).numpy() for r in range(comm.size))
    g, counts = other.allgatherv(_rank_data(comm.rank, (comm.rank + 1, 2)))
    ref_g = np.concatenate([_rank_data(r, (r + 1, 2)).numpy() for r in range(comm.size)])
    t = _rank_data(comm.rank, (4,))
    other.broadcast_(t, root=1)
    ok = (other.rank == comm.rank and other.size == comm.size
          and np.allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)
          and np.allclose(s.numpy(), ref_s, rtol=0, atol=0) and np.array_equal(g.numpy(), ref_g)
          and counts == list(range(1, comm.size + 1))
          and np.array_equal(t.numpy(), _rank_data(1, (4,)).numpy()))
    mpi.close()
    other.close()
    assert _all_true(ok)


@pytest.mark.mpi
@pytest.mark.parametrize("progress", ["thread", "inline", "nonblocking"])
def test_allreduce_reused_resized_and_replaced_buffers(progress):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    n, r = comm.size, comm.rank
    backend = MPITransport(comm, progress=progress)
    t = torch.full((1000,), float(r + 1))
    for k in range(3):  # the hot path: the same tensor object again and again
        backend.allreduce_(t)
        assert torch.equal(t, torch.full((1000,), float(n * (n + 1) // 2) * n ** k))
    t.resize_(10).fill_(r + 1)  # same object and address, fewer bytes
    backend.allreduce_(t, average=True)
    assert torch.equal(t, torch.full((10,), (n + 1) / 2))
    del t
    for dtype in (torch.float64, torch.int64, torch.float32):  # fresh tensors, perhaps at the same address
        u = torch.arange(7, dtype=dtype) + r
        backend.allreduce_(u)
        assert torch.equal(u, (torch.arange(7) * n + n * (n - 1) // 2).to(dtype))
    h = backend.allreduce_async_(torch.ones(5) * (r + 1), average=True)
    assert torch.equal(h.wait(), torch.full((5,), (n + 1) / 2))
    assert backend.calls == 8
    backend.close()
