"""The torch.distributed transport (gloo on CPU) beyond the shared transport tests: the process
group's life (private group per transport, the default group hpc_dgrab made destroyed with the last
one, ``hd.shutdown()`` closing them), the refusals, and ``DistributedOptimizer(backend="gloo")``
against ``backend="mpi"`` on the same model, data and initial weights. mpirun -n 2 and -n 4.

Every rank computes, the outcomes are gathered, and every rank asserts (no assert before a
collective the others wait in). Every transport made here is closed here, on every rank in the
same order: a gloo group is destroyed while the interpreter is whole (pytorch#56297).
"""
import pytest
import torch
from torch import nn

from hpc_dgrab.comm import get_transport
from hpc_dgrab.comm.transport import Collectives, PointToPoint
from hpc_dgrab.errors import UserError

STEPS = 5


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _all_true(flag):
    return all(_world().allgather(bool(flag)))


def _dist():
    import torch.distributed as dist

    return dist


# ------------------------------------------------------------------ serial checks
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")
def test_nccl_without_cuda_is_a_one_line_user_error():
    with pytest.raises(UserError, match="nccl backend needs CUDA") as err:
        get_transport("nccl")
    assert "\n" not in str(err.value)


def test_unknown_torch_backend_is_a_user_error():
    from hpc_dgrab.comm.torchdist import TorchTransport

    with pytest.raises(UserError, match="choose from: gloo, nccl"):
        TorchTransport(backend="mpi")


# ------------------------------------------------------------------ the group's life
@pytest.mark.mpi(min_size=2)
def test_groups_live_until_the_last_transport_closes():
    dist = _dist()
    comm = _world()
    n, r = comm.size, comm.rank
    a = get_transport("gloo", comm)
    b = get_transport("torch", comm)                       # the default choice: gloo on this host
    x, y = torch.full((3,), float(r)), torch.full((2,), float(r + 1))
    ha, hb = a.allreduce_async_(x, average=True), b.allreduce_async_(y)
    ok = torch.equal(ha.wait(), torch.full((3,), (n - 1) / 2)) \
        and torch.equal(hb.wait(), torch.full((2,), float(n * (n + 1) // 2)))
    ok = ok and b.backend == "gloo" and a.group is not b.group and (a.rank, a.size) == (r, n) \
        and isinstance(a, Collectives) and not isinstance(a, PointToPoint)
    a.close()
    a.close()                                              # idempotent
    refused = []
    for call in (lambda: a.allreduce_(torch.ones(2)), lambda: a.allreduce_async_(torch.ones(2)),
                 lambda: a.allgather(torch.ones(2)), lambda: a.allgatherv(torch.ones(2)),
                 lambda: a.broadcast_(torch.ones(2))):
        try:
            call()
        except RuntimeError as exc:
            refused.append("closed" in str(exc))
    alive = dist.is_initialized()                          # b still holds the default group
    z = torch.full((2,), float(r))
    b.broadcast_(z, root=n - 1)
    b.close()
    ok = ok and refused == [True] * 5 and a.closed and alive and torch.equal(z, torch.full((2,), n - 1.0))
    ok = ok and b.closed and not dist.is_initialized()     # hpc_dgrab made it: destroyed with the last
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_a_communicator_that_disagrees_with_the_default_group_is_refused():
    from mpi4py import MPI

    t = get_transport("gloo", _world())
    try:
        get_transport("gloo", MPI.COMM_SELF)
        refused = False
    except UserError as exc:
        refused = "initialised as rank" in str(exc) and "\n" not in str(exc)
    t.close()
    assert _all_true(refused and not _dist().is_initialized())


@pytest.mark.mpi(min_size=2)
def test_shutdown_closes_torch_transports_and_the_default_group():
    import hpc_dgrab as hd

    comm = _world()
    hd.init(comm)
    live = [get_transport("gloo", comm) for _ in range(2)]
    for t in live:
        t.allreduce_(torch.ones(3))
    hd.shutdown()
    ok = all(t.closed for t in live) and not _dist().is_initialized()
    hd.init(comm)                                          # usable again: a new default group
    again = get_transport("gloo", comm)
    ok = ok and torch.equal(again.allreduce_(torch.ones(2)), torch.full((2,), float(comm.size)))
    again.close()
    assert _all_true(ok)


# ------------------------------------------------------------------ DistributedOptimizer
def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(backend, compression):
    """STEPS steps of SGD with momentum on rank-dependent data; the final parameters, flat."""
    import hpc_dgrab as hd

    comm = _world()
    model = _model()
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  model.named_parameters(), compression=compression, backend=backend,
                                  bucket_cap_mb=1e-3)      # a few buckets, their sums overlap backward
    gen = torch.Generator().manual_seed(100 + comm.rank)
    for _ in range(STEPS):
        x = torch.randn(8, 6, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("backend,compression", [("gloo", None), ("gloo", "regtopk"), ("torch", None)])
def test_distributed_optimizer_over_gloo_equals_the_mpi_one(backend, compression):
    import hpc_dgrab as hd

    comm = _world()
    hd.init(comm)
    make = (lambda: None) if compression is None else (lambda: hd.RegTopK(0.1))
    over_mpi = _train("mpi", make())
    over_gloo = _train(backend, make())           # "torch": gloo for CPU parameters
    start = torch.cat([p.detach().reshape(-1) for p in _model().parameters()])
    gap = float((over_mpi - over_gloo).abs().max())
    moved = float((over_gloo - start).abs().max())
    same_on_ranks = comm.allgather(over_gloo.numpy().tobytes())
    hd.shutdown()                                          # closes both transports, on every rank alike
    hd.init(comm)
    ok = gap <= 1e-6 and moved > 1e-3 and len(set(same_on_ranks)) == 1 and not _dist().is_initialized()
    assert _all_true(ok), (gap, moved)


# ------------------------------------------------------------------ backend choice
def test_choose_backend_names_and_defaults():
    from hpc_dgrab.comm import choose_backend

    assert choose_backend("allreduce") == "mpi" and choose_backend("gloo") == "gloo"
    assert choose_backend(None, torch.device("cpu")) == "mpi"
    assert choose_backend("torch", "cpu") == "gloo"
    with pytest.raises(UserError, match="unknown sync backend 'tcp'"):
        choose_backend("tcp")


@pytest.mark.mpi(min_size=2)
def test_init_with_a_torch_backend_makes_the_default_group_and_the_optimizer_default():
    """``hd.init(backend="gloo")``: DDP can be built at once, and a DistributedOptimizer without a
    backend runs over gloo (same parameters as over MPI); ``hd.shutdown()`` ends the group."""
    import hpc_dgrab as hd
    from hpc_dgrab.comm import choose_backend

    comm = _world()
    hd.init(comm, backend="gloo")
    dist = _dist()
    ok = dist.is_initialized() and dist.get_world_size() == comm.size and choose_backend() == "gloo"
    ddp = torch.nn.parallel.DistributedDataParallel(nn.Linear(3, 1))   # needs the default group
    ddp(torch.ones(2, 3)).sum().backward()
    ok = ok and torch.equal(ddp.module.weight.grad, torch.full((1, 3), 2.0))
    del ddp
    over_default = _train(None, None)
    opt_backend = choose_backend(None, torch.device("cpu"))
    hd.shutdown()
    hd.init(comm)                                   # no backend: MPI again
    ok = ok and not dist.is_initialized() and choose_backend(None, "cpu") == "mpi" and opt_backend == "gloo"
    over_mpi = _train("mpi", None)
    hd.shutdown()
    hd.init(comm)
    gap = float((over_mpi - over_default).abs().max())
    assert _all_true(ok and gap <= 1e-6), (ok, gap)
