"""The public API in one process: misuse errors, and 1-rank equivalence with plain torch."""
import copy

import pytest
import torch
from torch import nn

import hpc_dgrab as hd
from hpc_dgrab import api
from hpc_dgrab.errors import UserError
from hpc_dgrab.tensors import flat_params


def test_misuse_before_init_is_one_line(monkeypatch):
    monkeypatch.setattr(api, "_CONTEXT", None)
    model = nn.Linear(3, 2)
    for call in (lambda: hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1)),
                 hd.rank, hd.size, lambda: hd.broadcast_parameters(model.state_dict())):
        with pytest.raises(UserError) as info:
            call()
        assert "\n" not in str(info.value) and "hpc_dgrab.init()" in str(info.value)
    assert not hd.is_initialized()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_one_rank_equals_plain_optimizer_and_scheduler_still_syncs():
    hd.init()
    assert (hd.rank(), hd.size(), hd.local_rank(), hd.local_size()) == (0, 1, 0, 1)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(4, 5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4, 5), generator=g)
    model, ref = _model(), _model()
    base = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(base, step_size=2, gamma=0.5)  # wraps base.step on the instance
    opt = hd.DistributedOptimizer(base, model.named_parameters(), bucket_cap_mb=1e-4)
    assert isinstance(opt, torch.optim.Adam) and type(opt).__name__ == "Adam"
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    for x, y in zip(xs, ys):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        flag = opt.add_payload(torch.tensor([7.0, -1.5]))
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
        assert flag.value.tolist() == [7.0, -1.5]
    assert opt._sync.steps == 4          # the wrapper's step ran, not a scheduler-wrapped original
    assert torch.equal(flat_params(model), flat_params(ref))
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    state = copy.deepcopy(opt.state_dict())
    assert state["hpc_dgrab"]["steps"] == 4
    opt.load_state_dict(state)


def test_gradient_after_synchronize_is_an_error():
    hd.init()
    model = _model()
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    x = torch.randn(2, 4, dtype=torch.float64)
    model(x).sum().backward()
    opt.synchronize()
    model(x).sum().backward()   # reported by the next synchronize() (on every rank: never a hang)
    opt.step()
    opt.zero_grad()
    model(x).sum().backward()
    with pytest.raises(UserError, match=r"between synchronize\(\) and step\(\) on 1 of 1"):
        opt.step()
    opt.zero_grad()
    model(x).sum().backward()
    model(x).sum().backward()   # more passes than backward_passes_per_step: refused, not 2g or 3g
    with pytest.raises(UserError, match="backward_passes_per_step=1 backward passes before step"):
        opt.step()
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()                  # the state was reset: one pass per step works again
    with pytest.raises(UserError):
        hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), bucket_cap_mb=0)
    with pytest.raises(UserError, match="backend='mpi'"):
        hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), compression=hd.TopK(0.1),
                                backend="horovod")


def test_one_parameter_bucket_adopts_autograds_gradient():
    """A big layer's gradient is in memory once: between zero_grad() and backward its bucket holds
    no buffer, and backward's fresh tensor becomes the buffer (no copy); set_to_none=False and
    gradient accumulation (two backward passes per step) still work on the buffer."""
    hd.init()
    model, ref = _model(), _model()
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  model.named_parameters(), bucket_cap_mb=1e-4, backward_passes_per_step=2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    weight = model[0].weight                       # first in forward order: never the last bucket
    bucket = opt._sync.where[id(weight)][0]
    assert bucket.adoptable and bucket.index < len(opt._sync.buckets) - 1
    g = torch.Generator().manual_seed(2)
    for t in range(4):
        x, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
        set_to_none = t != 2
        opt.zero_grad(set_to_none=set_to_none)
        ref_opt.zero_grad(set_to_none=set_to_none)
        assert bucket.held == (not set_to_none)
        for _ in range(2):                         # the second backward accumulates into the buffer
            for m in (model, ref):
                nn.functional.cross_entropy(m(x), y).backward()
        assert weight.grad.data_ptr() == bucket.buf.data_ptr() and bucket.held
        opt.synchronize()
        assert torch.equal(weight.grad, ref[0].weight.grad)
        with opt.skip_synchronize():
            opt.step()
        ref_opt.step()
    assert torch.equal(flat_params(model), flat_params(ref))
    assert opt.buffer_bytes()["gradients"] == sum(p.numel() * 8 for p in model.parameters()) \
        + (opt._sync.buckets[-1].store.numel() - opt._sync.buckets[-1].numel) * 8


def test_long_payload_region_given_back_after_the_step():
    """A long payload (D-GraB's order data is one number per parameter) is copied straight into the
    last message and its sum read back as a view; after step() the region is given back, the sum
    stays readable and the last bucket's gradients keep their values."""
    from hpc_dgrab.optim import buckets

    hd.init()
    model = _model()
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    last = opt._sync.buckets[-1]
    small = last.store.numel()
    long = torch.arange(2 * 2 ** 20 // 8 + 5, dtype=torch.float64)        # 2 MiB + 40 bytes
    for _ in range(2):
        opt.zero_grad()
        x = torch.randn(3, 4, dtype=torch.float64)
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
        pay = opt.add_payload(long)
        opt.synchronize()
        assert last.store.numel() >= small + long.numel()
        assert pay.value.data_ptr() == last.store[last.numel].data_ptr()   # a view, no copy
        grads = [p.grad.clone() for p in last.params]
        opt.step()
        assert last.store.numel() == small and torch.equal(pay.value, long)
        assert all(torch.equal(p.grad, g) and p.grad.data_ptr() >= last.store.data_ptr()
                   for p, g in zip(last.params, grads))
    assert buckets.KEEP_PAYLOAD_MB * 2 ** 20 < long.nbytes
