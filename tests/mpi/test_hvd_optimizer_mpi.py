"""DistributedOptimizer's Horovod keywords under MPI (2-4 ranks), each against one process that
backpropagates the mean (op=Average) or the sum (op=Sum) of every rank's loss: predivide factor,
num_groups/groups, sparse gradients, fp16/bf16 compression, process sets, and the refusals."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import hpc_dgrab as hd
from hpc_dgrab import runtime
from hpc_dgrab.errors import UserError
from hpc_dgrab.tensors import flat_params

pytestmark = pytest.mark.mpi


class Net(nn.Module):
    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.emb(idx))))


class Sub:
    """A process set from ``COMM_WORLD.Split`` (what ``hd.ProcessSet`` offers)."""

    def __init__(self, ranks):
        from mpi4py import MPI

        world = runtime.world()
        self.ranks = sorted(ranks)
        comm = world.Split(0 if world.rank in self.ranks else MPI.UNDEFINED, key=world.rank)
        self.mpi_comm = None if comm == MPI.COMM_NULL else comm

    def included(self):
        return self.mpi_comm is not None


def _world():
    comm = runtime.world()
    if comm.size < 2:
        pytest.skip("needs 2 ranks")
    hd.init(comm)
    return comm


def _data(n, steps, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (n, steps, 6), generator=g), torch.randint(0, 3, (n, steps, 6), generator=g)


def _train(ranks, rank, steps=3, dtype=torch.float64, sparse=False, reduce="mean", **kw):
    """(this rank's model after ``steps`` distributed steps, the one-process reference's)."""
    torch.manual_seed(0)
    model = Net(sparse).to(dtype)
    ref = copy.deepcopy(Net(False).to(dtype))
    ref.load_state_dict(model.state_dict())
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9),
                                  model.named_parameters(), **kw)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
    x, y = _data(len(ranks), steps)
    me = ranks.index(rank)
    for t in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[me, t]), y[me, t]).backward()
        opt.step()
        ref_opt.zero_grad()
        total = sum(nn.functional.cross_entropy(ref(x[j, t]), y[j, t]) for j in range(len(ranks)))
        (total / len(ranks) if reduce == "mean" else total).backward()
        ref_opt.step()
    return opt, flat_params(model), flat_params(ref)


@pytest.mark.parametrize("kw, reduce", [
    ({}, "mean"),
    ({"op": hd.Average, "gradient_predivide_factor": 2.0}, "mean"),
    ({"op": hd.Sum}, "sum"),
    ({"num_groups": 2}, "mean"),
    ({"groups": 3}, "mean"),
    ({"backward_passes_per_step": 1, "sparse_as_dense": True, "sparse": True}, "mean"),
    ({"sparse": True}, "mean"),
    ({"compression": hd.Compression.none}, "mean"),
])
def test_keywords_match_one_process(kw, reduce):
    comm = _world()
    kw = dict(kw)
    sparse = kw.pop("sparse", False)
    opt, mine, ref = _train(list(range(comm.size)), comm.rank, sparse=sparse, reduce=reduce, **kw)
    everyone = comm.allgather(mine.numpy())
    assert all(np.array_equal(e, everyone[0]) for e in everyone)
    assert torch.max(torch.abs(mine - ref)).item() < 1e-10
    if "num_groups" in kw or "groups" in kw:
        assert len(opt._sync.buckets) == min(kw.get("num_groups") or kw["groups"], 6)


def test_explicit_groups_match_one_process():
    comm = _world()
    torch.manual_seed(0)
    model = Net().double()
    ref = copy.deepcopy(model)
    groups = [[model.head.weight, model.body.bias], [model.emb.weight]]
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.3), model.named_parameters(),
                                  groups=groups)
    plan = [{id(p) for p in b.params} for b in opt._sync.buckets]
    assert {id(model.head.weight), id(model.body.bias)} in plan and {id(model.emb.weight)} in plan
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    x, y = _data(comm.size, 2)
    for t in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[comm.rank, t]), y[comm.rank, t]).backward()
        opt.step()
        ref_opt.zero_grad()
        total = sum(nn.functional.cross_entropy(ref(x[j, t]), y[j, t]) for j in range(comm.size))
        (total / comm.size).backward()
        ref_opt.step()
    assert torch.max(torch.abs(flat_params(model) - flat_params(ref))).item() < 1e-12


@pytest.mark.parametrize("name, tol", [("fp16", 2e-3), ("bf16", 2e-2)])
def test_half_compression_is_the_mean_in_half_precision(name, tol):
    comm = _world()
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                  compression=getattr(hd.Compression, name), bucket_cap_mb=1e-4)
    assert len(opt._sync.buckets) > 1
    x, y = _data(comm.size, 1)
    nn.functional.cross_entropy(model(x[comm.rank, 0]), y[comm.rank, 0]).backward()
    opt.synchronize()
    (sum(nn.functional.cross_entropy(ref(x[j, 0]), y[j, 0]) for j in range(comm.size)) / comm.size).backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    want = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    scale = want.abs().max().item()
    assert torch.max(torch.abs(got - want)).item() <= tol * scale
    everyone = comm.allgather(got.numpy())
    assert all(np.array_equal(e, everyone[0]) for e in everyone)
    assert opt.bytes_sent < 4 * want.numel() + 4 * 64   # the gradient travelled in 2 bytes an entry
    opt.step()


def test_process_set_averages_over_its_ranks_only():
    comm = _world()
    if comm.size < 3:
        pytest.skip("needs 3 ranks")
    ps = Sub([0, 2])
    if not ps.included():   # as in Horovod: outside the set, the optimizer steps on local gradients
        torch.manual_seed(0)
        model = Net()
        ref = copy.deepcopy(model)
        opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                      process_set=ps)
        x, y = _data(comm.size, 1)
        for m, o in ((model, opt), (ref, torch.optim.SGD(ref.parameters(), lr=0.1))):
            o.zero_grad()
            nn.functional.cross_entropy(m(x[comm.rank, 0]), y[comm.rank, 0]).backward()
            o.step()
        assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters())) < 1e-7
        return
    _, mine, ref = _train(ps.ranks, comm.rank, process_set=ps)
    assert torch.max(torch.abs(mine - ref)).item() < 1e-10
    ps.mpi_comm.Free()


@pytest.mark.parametrize("kw, match", [
    ({"op": hd.Adasum}, "Adasum is not supported"),
    ({"op": hd.Sum, "gradient_predivide_factor": 2.0}, "only valid with op=hd.Average"),
    ({"compression": "fp16"}, "compression must be"),
    ({"groups": [[torch.zeros(2, requires_grad=True)]]}, "trainable parameter of the optimizer"),
])
def test_refusals_are_one_line_user_errors(kw, match):
    _world()
    model = Net()
    with pytest.raises(UserError, match=match):
        hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), **kw)
