"""GradAlign under MPI: the 2-rank hand example, beta = 0 equals large-batch SGD / local SGD, and
beta > 0 equals an independent single-process simulation of all the ranks (unequal batch sizes)."""
import numpy as np
import pytest
import torch
from torch import nn

import hpc_dgrab as hd
from hpc_dgrab import runtime
from hpc_dgrab.models import build_model
from hpc_dgrab.optim.gradalign import GradAlign
from hpc_dgrab.tensors import flat_params
from tests.helpers import transport

pytestmark = pytest.mark.mpi


def _half_mse(out, y):
    return 0.5 * ((out - y) ** 2).mean()


def test_two_rank_hand_example():
    """f_0 = 0.5 (w - 1)^2 (1 example), f_1 = 0.5 * 4 (w - 0.5)^2 (3 examples), w = 0, lr 0.1.

    g = (-1, -2), gbar = -7/4; beta 0.5: x_0 = 0.375, x_1 = -0.125; one step: 0.4375, 0.125;
    xbar = (0.4375 + 3 * 0.125) / 4 = 0.203125 (lr_server 1) and 0.1015625 (lr_server 0.5);
    beta 0 gives large-batch SGD: 0 + 0.1 * 7/4 = 0.175.
    """
    world = runtime.world()
    pair = world.Split(world.rank // 2, key=world.rank)  # ranks (0,1) and (2,3): two 2-rank jobs
    results = []
    for beta, lr_server in ((0.5, 1.0), (0.5, 0.5), (0.0, 1.0)):
        model = nn.Linear(1, 1, bias=False).double()
        with torch.no_grad():
            model.weight.zero_()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if pair.rank == 0:
            x, y = torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
        else:
            x, y = torch.full((3, 1), 2.0, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64)
        driver = GradAlign(model, opt, _half_mse, beta, 1, lr_server=lr_server,
                           transport=transport(pair))
        driver.round([(x, y)])
        results.append((model.weight.item(), driver.last_displacement_norm))
    pair.Free()
    everyone = world.allgather(results)
    for res in everyone:
        assert res[0][0] == pytest.approx(0.203125, abs=1e-15)
        assert res[1][0] == pytest.approx(0.1015625, abs=1e-15)
        assert res[2][0] == pytest.approx(0.175, abs=1e-15)
    for r, res in enumerate(everyone):  # |x_i - x|: 0.375 on pair rank 0, 0.125 on pair rank 1
        assert res[0][1] == pytest.approx(0.375 if r % 2 == 0 else 0.125, abs=1e-15)


def _problem(n_total=480, d=5, classes=3):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(n_total, d)))
    y = torch.from_numpy(rng.integers(0, classes, size=n_total))
    return x, y


def _model():
    torch.set_default_dtype(torch.float64)
    try:
        return build_model("logreg", (5,), 3, seed=11)
    finally:
        torch.set_default_dtype(torch.float32)


def _batches(x, y, rank, n, rounds, k, size_of):
    """rank r's batches: rows of a rank-private block, batch size size_of(r)."""
    block = len(x) // n
    xs, ys = x[rank * block:(rank + 1) * block], y[rank * block:(rank + 1) * block]
    b = size_of(rank)
    out = [(xs[j * b:(j + 1) * b], ys[j * b:(j + 1) * b]) for j in range(rounds * k)]
    assert all(len(bb[1]) == b for bb in out)
    return out


def test_beta_zero_equals_large_batch_sgd():
    comm = runtime.world()
    n, rounds = comm.size, 5
    x, y = _problem()
    mine = _batches(x, y, comm.rank, n, rounds, 1, lambda r: 6)
    a, b = _model(), _model()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    hd.init(comm)
    ga = GradAlign(a, opt_a, nn.functional.cross_entropy, 0.0, 1)
    sync = hd.DistributedOptimizer(opt_b, b.named_parameters())
    for t in range(rounds):
        ga.round([mine[t]])
        sync.zero_grad()
        nn.functional.cross_entropy(b(mine[t][0]), mine[t][1]).backward()
        sync.step()
    pa, pb = flat_params(a).numpy(), flat_params(b).numpy()
    diffs = comm.allgather(float(np.max(np.abs(pa - pb))))
    replicas = comm.allgather(pa)
    assert max(diffs) < 1e-13
    for other in replicas:
        assert np.max(np.abs(other - replicas[0])) < 1e-15


def _simulate(x, y, n, rounds, k, size_of, beta, lr, lr_server):
    """Independent reference: one process, explicit flat logreg, plain SGD, all n workers."""
    w = flat_params(_model()).clone()

    def grad(wv, xb, yb):
        wv = wv.clone().requires_grad_(True)
        weight, bias = wv[:15].view(3, 5), wv[15:]
        loss = nn.functional.cross_entropy(xb @ weight.T + bias, yb)
        return torch.autograd.grad(loss, wv)[0]

    data = [_batches(x, y, r, n, rounds, k, size_of) for r in range(n)]
    counts = torch.tensor([float(size_of(r) * k) for r in range(n)], dtype=torch.float64)
    for t in range(rounds):
        rb = [data[r][t * k:(t + 1) * k] for r in range(n)]
        g = [grad(w, torch.cat([b[0] for b in rb[r]]), torch.cat([b[1] for b in rb[r]])) for r in range(n)]
        gbar = sum(c * gi for c, gi in zip(counts, g)) / counts.sum()
        xs = []
        for r in range(n):
            xi = w - beta * (gbar - g[r])
            for xb, yb in rb[r]:
                xi = xi - lr * grad(xi, xb, yb)
            xs.append(xi)
        xbar = sum(c * xi for c, xi in zip(counts, xs)) / counts.sum()
        w = w - lr_server * (w - xbar)
    return w


@pytest.mark.parametrize("beta,k,lr_server", [(0.0, 3, 1.0), (0.2, 1, 1.0), (0.2, 3, 0.7)])
def test_matches_single_process_simulation_with_unequal_batches(beta, k, lr_server):
    comm = runtime.world()
    n, rounds, lr = comm.size, 3, 0.4
    x, y = _problem()
    size_of = lambda r: 2 + 2 * r  # noqa: E731 - unequal sample counts per rank
    mine = _batches(x, y, comm.rank, n, rounds, k, size_of)
    model = _model()
    driver = GradAlign(model, torch.optim.SGD(model.parameters(), lr=lr), nn.functional.cross_entropy,
                       beta, k, lr_server=lr_server)
    for t in range(rounds):
        driver.round(mine[t * k:(t + 1) * k])
    ref = _simulate(x, y, n, rounds, k, size_of, beta, lr, lr_server)
    diff = comm.allgather(float((flat_params(model) - ref).abs().max()))
    moved = float((ref - flat_params(_model())).abs().max())
    assert max(diff) < 1e-12
    assert moved > 1e-2  # the test moved the model at all
