"""DistributedOptimizer under MPI (2 or 4 ranks): more backward passes than
``backward_passes_per_step`` and settings or payload sizes that differ across ranks are the same
one-line collective UserError on every rank (caught here on every rank), never a hang nor a wrong
gradient; the optimizer works again after ``zero_grad()``."""
import copy
import gc

import pytest
import torch
from torch import nn

import hpc_dgrab as hd
from hpc_dgrab import runtime
from hpc_dgrab.errors import UserError

pytestmark = pytest.mark.mpi


@pytest.fixture(autouse=True)
def _collect_on_every_rank():
    """Close this test's transports on every rank at the same point: a caught error's traceback holds
    the optimizer in a cycle, which the collector would otherwise free at different times."""
    yield
    gc.collect()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def _opt(model: nn.Module, **kw) -> torch.optim.Optimizer:
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    return hd.DistributedOptimizer(sgd, model.named_parameters(), **kw)


def _backward(model: nn.Module) -> None:
    model(torch.ones(3, 4, dtype=torch.float64)).sum().backward()


def _collective_error(fn, *fragments: str) -> str:
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and info.value.collective, msg
    for frag in fragments:
        assert frag in msg, msg
    # every rank raised the same line
    assert len(set(runtime.world().allgather(msg))) == 1
    return msg


@pytest.mark.parametrize("cap", [25, 1e-4])   # one bucket; several (some in flight during backward)
@pytest.mark.parametrize("who", ["all", "rank1"])
def test_extra_backward_is_one_error_on_every_rank(cap, who):
    comm = runtime.world()
    hd.init(comm)
    model = _model()
    opt = _opt(model, bucket_cap_mb=cap)
    opt.zero_grad()
    _backward(model)
    if who == "all" or comm.rank == 1:
        _backward(model)
    ranks = comm.size if who == "all" else 1
    _collective_error(opt.step, "backward_passes_per_step=1", f"on {ranks} of {comm.size} rank(s)")
    # recovered: one backward per step gives the plain mean again on every rank
    ref = copy.deepcopy(model)   # the failed step changed no parameter
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    for m, o in ((model, opt), (ref, ref_opt)):
        o.zero_grad()
        _backward(m)
        o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-12)   # identical inputs on every rank: the mean is g


def test_passes_two_accepts_two_refuses_three():
    comm = runtime.world()
    hd.init(comm)
    model = _model()
    opt = _opt(model, backward_passes_per_step=2, bucket_cap_mb=1e-4)
    opt.zero_grad()
    _backward(model)
    _backward(model)
    opt.step()
    opt.zero_grad()
    for _ in range(2 if comm.rank else 3):
        _backward(model)
    _collective_error(opt.step, "backward_passes_per_step=2", f"on 1 of {comm.size}")


def test_backward_between_synchronize_and_step_is_reported_next_step():
    comm = runtime.world()
    hd.init(comm)
    model = _model()
    opt = _opt(model)
    opt.zero_grad()
    _backward(model)
    opt.synchronize()
    if comm.rank == 1:
        _backward(model)
    with opt.skip_synchronize():
        opt.step()
    opt.zero_grad()
    _backward(model)
    _collective_error(opt.step, "between synchronize() and step()", f"on 1 of {comm.size}")


@pytest.mark.parametrize("what, kw0, kw1", [
    ("compression", {}, {"compression": hd.TopK(0.1)}),
    ("compression", {"compression": hd.RegTopK(0.1)}, {"compression": hd.RegTopK(0.1, mu=2.0)}),
    ("compression", {"compression": hd.TopK(0.1)}, {"compression": hd.TopK(0.2)}),
    ("backward_passes_per_step", {}, {"backward_passes_per_step": 2}),
    ("bucket plan", {}, {"bucket_cap_mb": 1e-4}),
])
def test_settings_that_differ_are_one_error_at_construction(what, kw0, kw1):
    comm = runtime.world()
    hd.init(comm)
    model = _model()
    kw = kw1 if comm.rank == 1 else kw0
    msg = _collective_error(lambda: _opt(model, **kw), what, "rank 1 has")
    assert "differs across ranks" in msg


@pytest.mark.parametrize("compression", [None, hd.TopK(0.5)])
@pytest.mark.parametrize("step", [0, 2])
def test_payload_sizes_that_differ_are_one_error(compression, step):
    """At the first step, or when one rank changes its sizes later: one error, never a hang."""
    comm = runtime.world()
    hd.init(comm)
    model = _model()
    opt = _opt(model, compression=compression)
    for _ in range(step):
        opt.zero_grad()
        _backward(model)
        payload = opt.add_payload(torch.ones(2, dtype=torch.float64))
        opt.step()
        assert payload.value is not None and payload.value.tolist() == [comm.size] * 2
    opt.zero_grad()
    _backward(model)
    opt.add_payload(torch.ones(3 if comm.rank == 1 else 2, dtype=torch.float64))
    _collective_error(opt.step, "payload sizes (rank 0 has [2], rank 1 has [3])")
    # every rank changes to the same new sizes: summed right, then as usual
    for _ in range(2):
        opt.zero_grad()
        _backward(model)
        payload = opt.add_payload(torch.arange(4, dtype=torch.float64))
        opt.step()
        assert payload.value is not None and payload.value.tolist() == [comm.size * i for i in range(4)]
