"""CHOCO-gossip numerics (hpc_dgrab.comm.choco), in one process: a lock-step simulation of n ranks."""
import pytest
import torch

from hpc_dgrab import checkpoint
from hpc_dgrab.comm.choco import (ChocoState, consensus_distance, decode, default_gamma, encode,
                                  message_numel, mixing_weights)
from hpc_dgrab.comm.topology import Topology
from hpc_dgrab.compress import RegTopK, TopK


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_message_round_trip(dtype):
    idx = torch.tensor([5, 0, 123456], dtype=torch.int64)
    val = torch.tensor([1.5, -2.0, 3.25], dtype=dtype)
    buf = torch.empty(message_numel(3), dtype=dtype)
    got_idx, got_val = decode(encode(idx, val, buf))
    assert torch.equal(got_idx, idx) and torch.equal(got_val, val)


def test_mixing_weights_are_rows_of_a_doubly_stochastic_matrix():
    ring = Topology.from_name("ring", 5)
    assert mixing_weights(ring, 0) == {1: pytest.approx(1 / 3), 4: pytest.approx(1 / 3)}
    expo = Topology.from_name("exponential", 8)
    w = mixing_weights(expo, 3)
    assert sorted(w) == sorted(expo.in_neighbors(3)) and all(v == pytest.approx(1 / 4) for v in w.values())
    with pytest.raises(ValueError, match="static graph"):
        mixing_weights(Topology.from_name("one-peer-exponential", 8), 0)
    star = Topology.from_edges(3, [(0, 1), (1, 2), (2, 0), (0, 2)], directed=True)
    with pytest.raises(ValueError, match="doubly stochastic"):
        mixing_weights(star, 0)


def test_default_gamma():
    assert default_gamma(0.01) == pytest.approx(0.02) and default_gamma(0.6) == 1.0


def _simulate(topo, xs, compressor, gamma, steps, grads=None, lr=0.0):
    """Lock-step CHOCO: (gradient,) consensus, select, send to every out-neighbour."""
    n = topo.n
    states = [ChocoState.start(torch.zeros_like(xs[0]), mixing_weights(topo, i), gamma) for i in range(n)]
    for _ in range(steps):
        if grads is not None:
            for i in range(n):
                xs[i].sub_(grads(i, xs[i]), alpha=lr)
        for i in range(n):
            states[i].consensus_(xs[i])
        msgs = []
        for i in range(n):
            idx, val = states[i].select(xs[i], compressor)
            states[i].apply_own(idx, val)
            msgs.append((i, idx, val))
        for i, idx, val in msgs:
            for j in topo.out_neighbors(i):
                states[j].apply_received(i, idx, val)
    return states


@pytest.mark.parametrize("name,compressor", [("ring", TopK(0.25)), ("exponential", RegTopK(0.25)),
                                             ("torus", TopK(0.25))])
def test_consensus_keeps_the_mean_and_contracts(name, compressor):
    """Lock-step, every copy current: the mean is kept to rounding, the models agree (distance
    1e-10 of the start within 400 steps at density 0.25, gamma 0.5) and every copy equals its
    owner's public copy bit for bit."""
    topo = Topology.from_name(name, 8)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(100, generator=g, dtype=torch.float64) for _ in range(8)]
    mean0, d0 = torch.stack(xs).mean(0), consensus_distance(xs)
    states = _simulate(topo, xs, compressor, default_gamma(0.25), 400)
    assert torch.allclose(torch.stack(xs).mean(0), mean0, atol=1e-12, rtol=0)
    assert consensus_distance(xs) < 1e-10 * d0
    for i, st in enumerate(states):
        for j, copy in st.copies.items():
            assert torch.equal(copy, states[j].x_hat), (i, j)


def test_sgd_on_a_quadratic_reaches_the_optimum():
    """Rank i minimises 0.5 ||x - b_i||^2: the average reaches mean(b) (the consensus bias of the
    own models is O(lr / gamma)); then with lr 0 every own model reaches it."""
    topo = Topology.from_name("ring", 6)
    g = torch.Generator().manual_seed(2)
    b = torch.randn(6, 100, generator=g, dtype=torch.float64)
    xs = [torch.zeros(100, dtype=torch.float64) for _ in range(6)]
    _simulate(topo, xs, TopK(0.2), 0.4, 300, grads=lambda i, x: x - b[i], lr=0.1)
    assert float((torch.stack(xs).mean(0) - b.mean(0)).abs().max()) < 1e-10
    _simulate(topo, xs, TopK(0.2), 0.4, 600)
    assert max(float((x - b.mean(0)).abs().max()) for x in xs) < 1e-8


def test_state_round_trips_through_the_checkpoint_format():
    topo = Topology.from_name("ring", 4)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4)]
    states = _simulate(topo, xs, RegTopK(0.2), 0.4, 5)
    tensors, tree = checkpoint.encode(states[0].state_dict())
    fresh = ChocoState.start(torch.zeros(50, dtype=torch.float64), mixing_weights(topo, 0), 0.4)
    fresh.load_state_dict(checkpoint.decode(tensors, tree))
    assert torch.equal(fresh.x_hat, states[0].x_hat)
    assert all(torch.equal(fresh.copies[j], states[0].copies[j]) for j in fresh.copies)
    assert sorted(fresh.cstate) == ["agg", "idx", "val"]
    assert fresh.sent is not None and torch.equal(fresh.sent[0], states[0].sent[0])
    wrong = ChocoState.start(torch.zeros(50, dtype=torch.float64), {7: 0.5}, 0.4)
    with pytest.raises(ValueError, match="copies"):
        wrong.load_state_dict(states[0].state_dict())
    with pytest.raises(ValueError, match="gamma"):
        ChocoState.start(xs[0], {}, 0.0)
