"""The public API under MPI (run with 4 ranks; 2- and 3-rank cases use sub-communicators).

DistributedOptimizer against one process that backpropagates the mean of every rank's loss (and on
the union of the ranks' batches), against one flat exchange (tests/flat_sync.py), compression
bit-identity and resume, the payload channel, and collective one-line errors for mismatched models.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import hpc_dgrab as hd
from hpc_dgrab import runtime
from hpc_dgrab.compress import GradientExchange
from hpc_dgrab.errors import UserError
from hpc_dgrab.models import build_model
from hpc_dgrab.optim.agreement import N_FLAGS
from hpc_dgrab.tensors import flat_params
from tests.helpers import FlatSync, transport

pytestmark = pytest.mark.mpi

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Net(nn.Module):
    """A frozen input layer, LayerNorm, a branch only some ranks use, and a layer nobody uses."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(5, 6)
        self.frozen.requires_grad_(False)
        self.body = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.branch = nn.Linear(8, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, use_branch: bool = False) -> torch.Tensor:
        h = self.norm(torch.tanh(self.body(self.frozen(x))))
        out = self.head(h)
        return out + self.branch(h) if use_branch else out


def _sub(k):
    """The first k world ranks as a communicator (None on the others)."""
    from mpi4py import MPI

    world = runtime.world()
    if world.size < k:
        pytest.skip(f"needs {k} ranks")
    sub = world.Split(0 if world.rank < k else MPI.UNDEFINED, key=world.rank)
    return None if sub == MPI.COMM_NULL else sub


def _data(n, steps, batch, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, steps, batch, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n, steps, batch), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def _net(seed):
    torch.manual_seed(seed)
    return Net().double().to(DEVICE)


def _gathered(comm, model):
    return comm.allgather(flat_params(model).cpu().numpy())


def _sgd(params):
    return torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=1e-2)


@pytest.mark.parametrize("k", [2, 3])
def test_matches_one_process_on_mean_loss(k):
    comm = _sub(k)
    if comm is None:
        return
    hd.init(comm)
    steps, batch = 5, 4
    x, y = _data(k, steps, batch)
    model = _net(seed=100 + comm.rank)                     # different inits on every rank ...
    hd.broadcast_parameters(model.state_dict(), root_rank=0)  # ... made equal by the broadcast
    ref = copy.deepcopy(model)
    opt = hd.DistributedOptimizer(_sgd(model.parameters()), model.named_parameters(), bucket_cap_mb=2e-4)
    hd.broadcast_optimizer_state(opt, root_rank=0)
    assert len(opt._sync.buckets) > 2
    ref_opt = _sgd(ref.parameters())
    for t in range(steps):
        opt.zero_grad()
        r = comm.rank
        nn.functional.cross_entropy(model(x[r, t], use_branch=(r == 0)), y[r, t]).backward()
        opt.step()
        ref_opt.zero_grad()
        mean_loss = sum(nn.functional.cross_entropy(ref(x[j, t], use_branch=(j == 0)), y[j, t])
                        for j in range(k)) / k
        mean_loss.backward()
        ref_opt.step()
    everyone = _gathered(comm, model)
    for other in everyone:
        assert np.array_equal(other, everyone[0])
    assert np.max(np.abs(everyone[0] - flat_params(ref).cpu().numpy())) < 1e-5
    assert np.max(np.abs(everyone[0] - flat_params(ref).cpu().numpy())) < 1e-12   # it is exact in fact
    assert model.unused.weight.grad is None          # no rank used it: skipped like in one process
    assert torch.equal(model.frozen.weight, ref.frozen.weight)
    comm.Free()


def test_init_is_collective_whatever_each_rank_did_before():
    # world, then a sub-communicator of only some ranks, then world again: ranks whose last init
    # was on the world and ranks whose last was on the sub-communicator both do init's collective
    # (a rank-local "already on this communicator" shortcut hung the others in Split_type)
    world = runtime.world()
    hd.init(world)
    sub = _sub(max(1, world.size - 1))
    if sub is not None:
        hd.init(sub)
        sub.Free()
    hd.init(world)
    assert hd.rank() == world.rank
    assert world.allreduce(1) == world.size


def _train_branch_net(x, y, r, steps, wrap, exchanger):
    """Train ``_net(seed=1)`` (its branch on) for ``steps`` on rank ``r``'s batches: through
    ``wrap(model, sgd)`` (a DistributedOptimizer) when given, else through one flat exchange per
    step. Returns (flat parameters, the optimizer's bytes_sent or None)."""
    model = _net(seed=1)
    model.unused = nn.Identity()  # the flat path gives unused parameters zero gradients
    opt = _sgd(model.parameters())
    if wrap is not None:
        opt = wrap(model, opt)
        for t in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[r, t], True), y[r, t]).backward()
            opt.step()
        return flat_params(model).cpu().numpy(), opt.bytes_sent
    driver = FlatSync(model, opt, lambda out, yy: nn.functional.cross_entropy(out, yy), exchanger)
    model.forward_branch = model.forward
    model.forward = lambda xx: model.forward_branch(xx, True)
    for t in range(steps):
        driver.step(x[r, t], y[r, t])
    return flat_params(model).cpu().numpy(), None


def test_buckets_equal_one_flat_allreduce(monkeypatch):
    from hpc_dgrab.comm import mpi

    comm = runtime.world()
    hd.init(comm)
    n, steps, batch = comm.size, 4, 3
    x, y = _data(n, steps, batch, seed=5)

    def run(use_api, cap):
        wrap = (lambda model, opt: hd.DistributedOptimizer(opt, model.named_parameters(),
                                                           bucket_cap_mb=cap)) if use_api else None
        return _train_branch_net(x, y, comm.rank, steps, wrap, GradientExchange(transport(comm)))

    flat, _ = run(False, None)
    many, nbytes = run(True, 1e-4)
    one, _ = run(True, 25)
    chunk = mpi.pieces
    monkeypatch.setattr(mpi, "pieces", lambda msg: chunk(msg, 104))   # every sum in pieces of 13 numbers
    pieces, _ = run(True, 25)
    assert np.max(np.abs(many - flat)) < 1e-12
    assert np.max(np.abs(one - flat)) < 1e-12
    assert np.max(np.abs(pieces - flat)) < 1e-12
    d = flat.size
    # every step sends the gradient plus one used-flag per trainable tensor and the step's flags,
    # in float64
    assert nbytes == steps * 8 * (d + 8 + N_FLAGS)


@pytest.mark.parametrize("method", ["topk", "regtopk"])
def test_compression_equals_one_flat_compressed_exchange(method):
    """DistributedOptimizer's compression (each parameter's gradient kept as its own tensor) gives
    bit for bit what one flat GradientExchange of the same method gives."""
    comm = runtime.world()
    hd.init(comm)
    n, steps, batch = comm.size, 5, 3
    x, y = _data(n, steps, batch, seed=6)
    r = comm.rank

    def run(use_api):
        compression = hd.TopK(density=0.2) if method == "topk" else hd.RegTopK(density=0.2, mu=4.0)
        wrap = (lambda model, opt: hd.DistributedOptimizer(opt, model.named_parameters(),
                                                           compression=compression)) if use_api else None
        ex = GradientExchange(transport(comm), compression)
        return _train_branch_net(x, y, r, steps, wrap, ex)[0]

    flat, parts = run(False), run(True)
    assert np.array_equal(parts, flat)
    assert not np.array_equal(flat, flat_params(_net(seed=1)).cpu().numpy())   # it did train


def test_payload_sums_exactly_dense_and_compressed():
    comm = runtime.world()
    hd.init(comm)
    n, r = comm.size, comm.rank
    for compression in (None, hd.TopK(density=0.3)):
        model = _net(seed=2)
        opt = hd.DistributedOptimizer(_sgd(model.parameters()), model.named_parameters(),
                                      compression=compression, bucket_cap_mb=1e-4)
        x, y = _data(n, 1, 4)
        got = []
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[r, 0]), y[r, 0]).backward()
        a = opt.add_payload(torch.tensor([r + 1.0, 2.0 ** 20 + r]))
        b = opt.add_payload(torch.tensor([float(r == 1)]), on_result=got.append)
        # longer than 1 MiB: given back after the step (dense), its own all-reduce (compressed)
        long = opt.add_payload(torch.arange(2 ** 17 + 5, dtype=torch.float64) + r)
        opt.step()
        assert a.value.tolist() == [n * (n + 1) / 2, n * 2.0 ** 20 + n * (n - 1) / 2]
        assert b.value.tolist() == [1.0] and got[0].tolist() == [1.0]
        assert torch.equal(long.value, n * torch.arange(2 ** 17 + 5, dtype=torch.float64) + n * (n - 1) / 2)


def test_compression_bit_identical_and_resumes():
    comm = runtime.world()
    hd.init(comm)
    n, r = comm.size, comm.rank
    steps = 6
    x, y = _data(n, steps, 4, seed=9)

    def make(model):
        return hd.DistributedOptimizer(_sgd(model.parameters()), model.named_parameters(),
                                       compression=hd.RegTopK(density=0.1, mu=4.0))

    def train(model, opt, ts):
        for t in ts:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[r, t], use_branch=(r == 0)), y[r, t]).backward()
            opt.step()

    model = _net(seed=50 + r)
    hd.broadcast_parameters(model.state_dict())
    opt = make(model)
    train(model, opt, range(3))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert saved_opt["hpc_dgrab"]["compression"]["method"] == "regtopk"
    train(model, opt, range(3, steps))
    everyone = _gathered(comm, model)
    for other in everyone:
        assert np.array_equal(other, everyone[0])
    assert opt.bytes_sent > 0
    resumed = _net(seed=0)
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, range(3, steps))
    assert np.array_equal(flat_params(resumed).cpu().numpy(), everyone[r])
    assert opt2.bytes_sent == opt.bytes_sent


def test_backward_passes_per_step_and_clipping():
    comm = runtime.world()
    hd.init(comm)
    n, r = comm.size, comm.rank
    x, y = _data(n, 2, 4, seed=11)
    model = _net(seed=4)
    ref = copy.deepcopy(model)
    opt = hd.DistributedOptimizer(_sgd(model.parameters()), model.named_parameters(),
                                  backward_passes_per_step=2, bucket_cap_mb=1e-4)
    opt.zero_grad()
    for t in range(2):
        nn.functional.cross_entropy(model(x[r, t]), y[r, t]).backward()
    opt.synchronize()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    with opt.skip_synchronize():
        opt.step()
    ref_opt = _sgd(ref.parameters())
    ref_opt.zero_grad()
    loss = sum(nn.functional.cross_entropy(ref(x[j, t]), y[j, t]) for j in range(n) for t in range(2)) / n
    loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    ref_opt.step()
    assert abs(float(norm) - float(ref_norm)) < 1e-10
    assert np.max(np.abs(flat_params(model).cpu().numpy() - flat_params(ref).cpu().numpy())) < 1e-12


def test_mismatched_parameters_one_line_collective_error():
    comm = runtime.world()
    hd.init(comm)
    model = _net(seed=0)
    if comm.rank == 1:
        model.body = nn.Linear(6, 9).double()   # a different shape on one rank
    with pytest.raises(UserError) as info:
        hd.DistributedOptimizer(_sgd(model.parameters()), model.named_parameters())
    msg = str(info.value)
    assert "\n" not in msg and "body.weight" in msg and "rank 1" in msg and info.value.collective
    with pytest.raises(UserError) as info:
        hd.broadcast_parameters(model.state_dict())
    assert "\n" not in str(info.value) and "body" in str(info.value)


@pytest.mark.parametrize("order", ["dgrab", "grab"])
def test_sampler_gives_the_trainer_orders(order):
    """OrderedSampler + DistributedOptimizer in a user's DataLoader loop = one flat exchange per step
    with the same sorter."""
    from hpc_dgrab.order import make_sorter

    comm = runtime.world()
    hd.init(comm)
    n, r = comm.size, comm.rank
    num, batch, epochs = 24, 4, 3
    g = torch.Generator().manual_seed(20 + r)
    x = torch.randn(num, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (num,), generator=g)
    loss_fn = nn.functional.cross_entropy

    def mlp():
        torch.manual_seed(8)
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()

    model_a = mlp()
    opt_a = _sgd(model_a.parameters())
    sorter = make_sorter(order, num, seed=0, rank=r, world_size=n)
    driver = FlatSync(model_a, opt_a, loss_fn, GradientExchange(transport(comm)))
    orders_a = []
    for _ in range(epochs):
        orders_a.append(sorter.epoch_order().copy())
        for t in range(num // batch):
            idx = sorter.epoch_order()[t * batch:(t + 1) * batch]
            driver.step(x[idx], y[idx], sorter=sorter, indices=idx)
        sorter.end_epoch()

    model_b = mlp()
    sampler = hd.OrderedSampler(num, order=order, seed=0, batch_size=batch)
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler)
    opt_b = hd.DistributedOptimizer(_sgd(model_b.parameters()), model_b.named_parameters(), sampler=sampler)
    orders_b = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        orders_b.append(sampler.order().copy())
        for xb, yb in loader:
            opt_b.zero_grad()
            sampler.backward(model_b, loss_fn, xb, yb)
            opt_b.step()
    for a, b in zip(orders_a, orders_b):
        assert np.array_equal(a, b)
    assert not np.array_equal(orders_a[1], orders_a[0])     # the sorter did reorder
    if order == "dgrab":
        assert sampler.sorter.diverged_steps == 0 and sorter.diverged_steps == 0
    # the same message as the flat [gradient | order data], plus one used-flag per tensor (4 here)
    # and the step's flags
    assert sampler.payload_bytes == driver.order_bytes      # the order data the sampler put in the channel
    assert opt_b.bytes_sent == driver.bytes_sent + epochs * (num // batch) * (4 + N_FLAGS) * 8
    assert np.max(np.abs(flat_params(model_a).numpy() - flat_params(model_b).numpy())) < 1e-12
    state = sampler.state_dict()
    again = hd.OrderedSampler(num, order=order, seed=0, batch_size=batch)
    again.load_state_dict(state)
    assert np.array_equal(again.order(), sampler.order())


@pytest.mark.timeout(60)
def test_gossip_optimizer_conserves_mass_and_converges():
    comm = runtime.world()
    hd.init(comm)
    r, n = comm.rank, comm.size
    target = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    start = torch.full((6,), 3.0 * (r + 1), dtype=torch.float64)

    def run(lr, steps):
        model = nn.Linear(6, 1, bias=False).double()
        with torch.no_grad():
            model.weight.copy_(start)
        opt = hd.GossipOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model, topology="exponential")
        assert isinstance(opt, torch.optim.SGD)
        for _ in range(steps + r):                 # ranks run different numbers of steps
            opt.zero_grad()
            (0.5 * ((model.weight[0] - target) ** 2).sum()).backward()
            opt.step()
        stats = opt.finish(timeout=30)
        own = model.weight.detach().clone()
        opt.average_model()
        return opt, stats, own, model.weight.detach()[0]

    # no gradient step moves the mass: the network average is the mean of the starts, exactly
    opt, stats, _, avg = run(0.0, 20)
    assert torch.allclose(avg, torch.full((6,), 3.0 * (n + 1) / 2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert stats["steps"] == 20 + r and opt.bytes_sent == stats["bytes_sent"] > 0
    assert opt.staleness_max >= 0 and opt.staleness_avg >= 0
    # a common optimum: every rank's own model converges to it, whatever the timing. Not to 1e-6:
    # shares still in flight when a rank stops are absorbed in the final drain with the contraction
    # of the steps they missed (a fresh-clone CI run on a busy machine ended 1e-5 away)
    _, _, own, avg = run(0.5, 80)
    assert torch.allclose(own[0], target, atol=1e-4) and torch.allclose(avg, target, atol=1e-4)


# ------------------------------------------------- synchronous SGD = one process on the union
def _union_problem(n_total=96, d=5, classes=3):
    rng = np.random.default_rng(42)
    x = torch.from_numpy(rng.normal(size=(n_total, d)))
    y = torch.from_numpy(rng.integers(0, classes, size=n_total))
    return x, y


def _train_logreg(x_parts, y_parts, steps, batch, distributed):
    torch.set_default_dtype(torch.float64)
    try:
        model = build_model("logreg", (x_parts.shape[-1],), 3, seed=7)
    finally:
        torch.set_default_dtype(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    if distributed:
        opt = hd.DistributedOptimizer(opt, model.named_parameters())
    for t in range(steps):
        opt.zero_grad()
        xb, yb = x_parts[t * batch:(t + 1) * batch], y_parts[t * batch:(t + 1) * batch]
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return flat_params(model)


def test_transport_allreduce_exact_sum():
    comm = runtime.world()
    t = torch.arange(10, dtype=torch.float64) * (comm.rank + 1)
    transport(comm).allreduce_(t)
    n = comm.size
    expected = torch.arange(10, dtype=torch.float64) * (n * (n + 1) / 2)
    assert torch.equal(t, expected)


def test_distributed_optimizer_equals_single_process_on_union():
    comm = runtime.world()
    hd.init(comm)
    n, batch, steps = comm.size, 4, 6
    x, y = _union_problem()
    # rank r owns rows r, r+n, r+2n, ... and visits them in that order
    mine = _train_logreg(x[comm.rank::n], y[comm.rank::n], steps, batch, distributed=True)
    # reference: one process, global batch t = the union of every rank's batch t
    xs = torch.stack([x[r::n] for r in range(n)])  # (n, m, d)
    ys = torch.stack([y[r::n] for r in range(n)])
    glob_x = torch.cat([xs[:, t * batch:(t + 1) * batch].reshape(-1, x.shape[1]) for t in range(steps)])
    glob_y = torch.cat([ys[:, t * batch:(t + 1) * batch].reshape(-1) for t in range(steps)])
    ref = _train_logreg(glob_x, glob_y, steps, batch * n, distributed=False)
    all_params = comm.allgather(mine.numpy())
    assert np.max(np.abs(mine.numpy() - ref.numpy())) < 1e-12
    for other in all_params:  # every rank holds bit-identical weights
        assert np.array_equal(other, all_params[0])


def _step_once(opt, model):
    opt.zero_grad()
    model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    opt.step()


def test_optimizers_collected_or_shut_down_leave_no_thread():
    """Each DistributedOptimizer's transport (its communication thread, its communicator) goes
    when the optimizer is collected, and every one on hd.shutdown()."""
    import gc
    import threading

    comm = runtime.world()
    hd.shutdown()                  # one operations engine (the world's) from here on
    hd.init(comm)
    model = nn.Linear(5, 3).double()
    gc.collect()
    before = threading.active_count()
    for _ in range(5):
        opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
        _step_once(opt, model)
        del opt
    gc.collect()
    assert threading.active_count() == before
    kept = [hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
            for _ in range(2)]
    for opt in kept:
        _step_once(opt, model)
    hd.shutdown()
    hd.init(comm)                  # the operations engine's thread again, counted in `before`
    assert threading.active_count() == before
    hd.init(comm)
