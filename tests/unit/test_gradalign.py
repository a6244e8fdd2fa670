"""GradAlign numerics on one process: the displacement, the weighted mean, the server step, one rank."""
import pytest
import torch
from torch import nn

from hpc_dgrab.compress import GradientExchange
from hpc_dgrab.models import build_model
from hpc_dgrab.optim.gradalign import GradAlign, displace, server_step
from hpc_dgrab.tensors import flat_params


def _self():
    """A transport over this process alone."""
    from mpi4py import MPI

    from hpc_dgrab.comm import get_transport

    return get_transport("mpi", MPI.COMM_SELF)


def test_displace_hand_example():
    # two ranks: g_0 = -1 (1 example), g_1 = -2 (3 examples) -> gbar = -7/4
    x = torch.tensor([0.0])
    gbar = torch.tensor([-1.75])
    assert displace(x, torch.tensor([-1.0]), gbar, 0.5).item() == 0.375
    assert displace(x, torch.tensor([-2.0]), gbar, 0.5).item() == -0.125
    # beta = 0: no displacement at all
    assert torch.equal(displace(x, torch.tensor([-1.0]), gbar, 0.0), x)


def test_server_step():
    x, xbar = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    assert torch.equal(server_step(x, xbar, 1.0), xbar)
    assert torch.equal(server_step(x, xbar, 0.5), torch.tensor([0.5, 3.0]))
    assert server_step(x, xbar) is not xbar


def test_weighted_mean_one_rank_and_counts_in_message():
    ex = GradientExchange(_self())
    v = torch.tensor([2.0, -4.0])
    out = ex.weighted_mean(v, 3.0)
    assert torch.equal(out, v)
    assert ex.bytes_sent == 3 * 4                 # [n v | n] in one message
    with pytest.raises(ValueError):
        ex.weighted_mean(v, 0.0)


def _linear_problem():
    torch.manual_seed(0)
    x = torch.randn(24, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    return x, y


@pytest.mark.parametrize("beta,steps", [(0.0, 1), (0.3, 1), (0.3, 4)])
def test_one_rank_is_plain_sgd(beta, steps):
    """On one rank gbar = g_i, so there is no displacement: GradAlign = SGD on the same batches."""
    x, y = _linear_problem()
    torch.set_default_dtype(torch.float64)
    try:
        a = build_model("logreg", (5,), 3, seed=1)
        b = build_model("logreg", (5,), 3, seed=1)
    finally:
        torch.set_default_dtype(torch.float32)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.2, momentum=0.5)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.2, momentum=0.5)
    driver = GradAlign(a, opt_a, nn.functional.cross_entropy, beta, steps, transport=_self())
    batches = [(x[4 * k:4 * k + 4], y[4 * k:4 * k + 4]) for k in range(6)]
    for r in range(6 // steps):
        driver.round(batches[r * steps:(r + 1) * steps])
    for xb, yb in batches[:(6 // steps) * steps]:
        opt_b.zero_grad()
        nn.functional.cross_entropy(b(xb), yb).backward()
        opt_b.step()
    assert torch.allclose(flat_params(a), flat_params(b), atol=1e-12, rtol=0)
    assert driver.rounds == 6 // steps
    expected_msgs = (2 if beta > 0 else 1) * driver.rounds
    assert driver.bytes_sent == expected_msgs * (flat_params(a).numel() + 1) * 8


def test_bad_arguments():
    m = nn.Linear(1, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for kwargs in ({"beta": -1.0}, {"beta": 0.1, "local_steps": 0}, {"beta": 0.1, "lr_server": 0.0}):
        with pytest.raises(ValueError):
            GradAlign(m, opt, nn.functional.mse_loss, transport=_self(), **kwargs)
    driver = GradAlign(m, opt, nn.functional.mse_loss, 0.1, 2, transport=_self())
    with pytest.raises(ValueError, match="local_steps"):
        driver.round([(torch.zeros(1, 1), torch.zeros(1, 1))])
