"""Gossip: push-sum numerics and metropolis mixing (a test helper), serial; the non-blocking engine
(mpirun -n 4)."""
import time

import numpy as np
import pytest
import torch

from hpc_dgrab.comm.gossip import GossipEngine, PushSum
from hpc_dgrab.comm.topology import Topology

DEADLINE_S = 30.0


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _all_true(flag):
    return all(_world().allgather(bool(flag)))


def _metropolis_weights(topo, rank, step=0):
    """(self weight, {in-neighbour: weight}) of ``rank``'s row of the metropolis matrix."""
    row = topo.mixing_matrix("metropolis", step)[rank]
    return float(row[rank]), {j: float(row[j]) for j in topo.in_neighbors(rank, step)}


def _metropolis_mix(topo, rank, x, received, step=0):
    """``x_i <- W_ii x_i + sum_j W_ij x_j`` (``received`` holds every in-neighbour's value)."""
    own, others = _metropolis_weights(topo, rank, step)
    assert set(others) <= set(received)
    out = x * own
    for j, w in others.items():
        out.add_(received[j].to(out.dtype), alpha=w)
    return out


def _x0(rank, numel=5):
    return torch.arange(numel, dtype=torch.float64) * (rank + 1) + 10.0 * rank ** 2


# ------------------------------------------------------------------ serial numerics
def test_push_sum_split_absorb_value():
    ps = PushSum(torch.tensor([6.0, 3.0], dtype=torch.float64), 1.0)
    share, w = ps.split(2)
    assert share is ps.x and torch.equal(share, torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert w == pytest.approx(1 / 3) and ps.w == pytest.approx(1 / 3)
    ps.absorb(torch.tensor([4.0, 4.0]), 2 / 3)
    assert torch.allclose(ps.value(), torch.tensor([6.0, 5.0], dtype=torch.float64))


def test_push_sum_simulated_on_directed_time_varying_graph_matches_matrix():
    """PushSum steps on every node == multiplying by the uniform (column-stochastic) matrices."""
    topo = Topology.from_name("one-peer-exponential", 8)
    states = [PushSum(_x0(r), 1.0) for r in range(8)]
    x = np.stack([_x0(r).numpy() for r in range(8)])
    w = np.ones(8)
    for step in range(30):
        sent = []
        for r, ps in enumerate(states):
            share, sw = ps.split(topo.out_degree(r, step))
            sent += [(j, share.clone(), sw) for j in topo.out_neighbors(r, step)]
        for j, share, sw in sent:
            states[j].absorb(share, sw)
        m = topo.mixing_matrix("uniform", step)
        x, w = m @ x, m @ w
    assert np.allclose(np.stack([ps.x.numpy() for ps in states]), x)
    assert np.allclose([ps.w for ps in states], w) and sum(ps.w for ps in states) == pytest.approx(8)
    mean = np.mean([_x0(r).numpy() for r in range(8)], axis=0)
    assert all(np.allclose(ps.value().numpy(), mean, atol=1e-9) for ps in states)


def test_metropolis_row_matches_matrix():
    topo = Topology.from_name("star", 4)
    own, others = _metropolis_weights(topo, 0)
    assert own == pytest.approx(1 / 4) and others == pytest.approx({1: 1 / 4, 2: 1 / 4, 3: 1 / 4})
    xs = {r: torch.full((2,), float(r)) for r in range(4)}
    assert torch.allclose(_metropolis_mix(topo, 0, xs[0], {j: xs[j] for j in (1, 2, 3)}),
                          torch.full((2,), 1.5))


# ------------------------------------------------------------------ MPI engine
def _wait_for(eng, inbox, keys):
    """Poll until every (sender, version) in ``keys`` is in ``inbox`` (synchronous rounds)."""
    end = time.monotonic() + DEADLINE_S
    while not all(k in inbox for k in keys):
        for m in eng.poll():
            inbox[(m.sender, m.version)] = (m.data.clone(), m.weight)
        if time.monotonic() > end:
            raise RuntimeError(f"rank {eng.rank}: gossip round never completed: {keys} vs {list(inbox)}")


def _sync_push_sum(topo, rounds):
    comm = _world()
    eng = GossipEngine(topo, 5, dtype=torch.float64, comm=comm, max_in_flight=4)
    ps = PushSum(_x0(comm.rank).clone(), 1.0)
    inbox = {}
    for t in range(rounds):
        share, w = ps.split(eng.out_degree(t))
        eng.push(share, w, version=t, step=t)
        keys = [(j, t) for j in eng.in_neighbors(t)]
        _wait_for(eng, inbox, keys)
        for k in keys:
            ps.absorb(*inbox.pop(k))
    rest = eng.close(timeout=DEADLINE_S)
    return eng, ps, rest


def _sync_metropolis(topo, rounds):
    comm = _world()
    eng = GossipEngine(topo, 5, dtype=torch.float64, comm=comm, max_in_flight=4, merge="replace")
    x = _x0(comm.rank).clone()
    inbox = {}
    for t in range(rounds):
        eng.push(x, 1.0, version=t)
        keys = [(j, t) for j in eng.in_neighbors(t)]
        _wait_for(eng, inbox, keys)
        x = _metropolis_mix(topo, comm.rank, x, {j: inbox.pop((j, t))[0] for j, _ in keys}, t)
    rest = eng.close(timeout=DEADLINE_S)
    return eng, x, rest


def _mean():
    return torch.stack([_x0(r) for r in range(_world().size)]).mean(dim=0)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ["ring", "erdos-renyi:0.5"])
def test_synchronous_metropolis_gossip_reaches_exact_mean(name):
    topo = Topology.from_name(name, _world().size, seed=2)
    eng, x, rest = _sync_metropolis(topo, rounds=120)
    ok = (torch.allclose(x, _mean(), rtol=0, atol=1e-6) and rest == [] and eng.stats()["replacements"] == 0
          and eng.stats()["messages_received"] == 120 * len(eng.in_neighbors()))
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("graph", ["exponential", "one-peer-exponential", "directed"])
def test_synchronous_push_sum_reaches_exact_mean(graph):
    n = _world().size
    if graph == "directed":   # a directed cycle plus one chord (from 4 ranks): not regular, not symmetric
        chord = [(0, n // 2)] if n >= 4 else []
        topo = Topology.from_edges(n, [(i, (i + 1) % n) for i in range(n)] + chord, directed=True)
    else:
        topo = Topology.from_name(graph, n)
    eng, ps, rest = _sync_push_sum(topo, rounds=150)
    weights = _world().allgather(ps.w)
    ok = (torch.allclose(ps.value(), _mean(), rtol=0, atol=1e-6) and rest == []
          and sum(weights) == pytest.approx(n, abs=1e-12))
    assert _all_true(ok)


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("receive_slots", [1, 2])
def test_asynchronous_gossip_with_a_sleeping_rank(receive_slots):
    """Rank 0 sleeps 10 ms per step and runs 20 steps; the others run 300 steps without waiting."""
    comm = _world()
    rank, n = comm.rank, comm.size
    topo = Topology.from_name("ring", n)
    eng = GossipEngine(topo, 5, dtype=torch.float64, comm=comm, max_in_flight=2, receive_slots=receive_slots)
    ps = PushSum(_x0(rank).clone(), 1.0)
    steps = 20 if rank == 0 else 300
    for step in range(steps):
        if rank == 0:
            time.sleep(0.01)
        share, w = ps.split(eng.out_degree(step))
        eng.push(share, w, version=step)
        for m in eng.poll():
            ps.absorb(m.data, m.weight)
    during = eng.stats()
    # receive_slots=2: drained shares copied out; 1: merged where they land (deliver)
    if receive_slots == 2:
        for m in eng.close(timeout=DEADLINE_S):
            ps.absorb(m.data, m.weight)
    else:
        assert eng.close(timeout=DEADLINE_S, deliver=lambda m: ps.absorb(m.data, m.weight)) == []
    stats = eng.stats()
    table = comm.allgather((ps.x.numpy().copy(), ps.w, stats, during["pushes"]))
    total_x = sum(t[0] for t in table)
    total_w = sum(t[1] for t in table)
    mean = _mean().numpy()
    neighbours_of_slow = [1, n - 1]
    ok = (abs(total_w - n) < 1e-12
          and np.allclose(total_x / total_w, mean, rtol=0, atol=1e-9)
          and np.allclose(total_x, mean * n, rtol=0, atol=1e-9)
          and all(table[r][3] == 300 for r in range(1, n))
          and all(table[r][2]["staleness_max"] > 0 and table[r][2]["staleness_avg"] > 0
                  for r in neighbours_of_slow)
          and sum(t[2]["messages_sent"] for t in table) == sum(t[2]["messages_received"] for t in table)
          and not eng._sreqs and not eng._rreqs and eng.closed)
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_replacement_counts_and_add_merge_conserve_mass():
    """max_in_flight=1 and a receiver that does not poll for a while: pushes coalesce, mass stays."""
    comm = _world()
    rank, n = comm.rank, comm.size
    topo = Topology.from_name("complete", n)
    eng = GossipEngine(topo, 1000, dtype=torch.float64, comm=comm, max_in_flight=1)
    x = torch.full((1000,), float(rank + 1), dtype=torch.float64)
    ps = PushSum(x, 1.0)
    for step in range(40):
        share, w = ps.split(eng.out_degree(step))
        eng.push(share, w, version=step)
        if rank != 0:                   # rank 0 never polls during the steps
            for m in eng.poll():
                ps.absorb(m.data, m.weight)
    for m in eng.close(timeout=DEADLINE_S):
        ps.absorb(m.data, m.weight)
    stats = comm.allgather(eng.stats())
    w_total = sum(comm.allgather(ps.w))
    x_total = sum(comm.allgather(float(ps.x.sum())))
    ok = (stats[1]["replacements"] > 0 and abs(w_total - n) < 1e-12
          and abs(x_total - 1000 * n * (n + 1) / 2) < 1e-6
          and all(s["messages_sent"] + s["replacements"] >= 40 * (n - 1) - (n - 1) for s in stats))
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_bad_arguments():
    comm = _world()
    topo = Topology.from_name("ring", comm.size)
    with pytest.raises(ValueError, match="ranks but the communicator"):
        GossipEngine(Topology.from_name("ring", comm.size + 1), 3, comm=comm)
    eng = GossipEngine(topo, 3, comm=comm)
    with pytest.raises(ValueError, match="expected 3 elements"):
        eng.push(torch.zeros(4))
    eng.close(timeout=DEADLINE_S)
    with pytest.raises(RuntimeError, match="closed"):
        eng.push(torch.zeros(3))


@pytest.mark.mpi(min_size=2)
def test_message_buffer_pushes_without_a_copy_and_conserves_mass():
    """Push-sum with shares written straight into the engine's buffer (max_in_flight=1, so pushes
    also coalesce into pending buffers): the same exact mass as the copying push."""
    comm = _world()
    rank, n = comm.rank, comm.size
    topo = Topology.from_name("one-peer-exponential", n)
    eng = GossipEngine(topo, 64, dtype=torch.float64, comm=comm, max_in_flight=1)
    ps = PushSum(_x0(rank, 64).clone(), 1.0)
    for step in range(60):
        share = 1.0 / (eng.out_degree(step) + 1)
        buf = eng.message_buffer()
        assert eng.message_buffer() is buf          # the same tensor until it is pushed
        torch.mul(ps.x, share, out=buf)
        ps.x.mul_(share)
        ps.w *= share
        eng.push(buf, ps.w, version=step)
        for m in eng.poll():
            ps.absorb(m.data, m.weight)
    for m in eng.close(timeout=DEADLINE_S):
        ps.absorb(m.data, m.weight)
    total_w = sum(comm.allgather(ps.w))
    total_x = sum(comm.allgather(ps.x.numpy().copy()))
    expected = sum(_x0(r, 64).numpy() for r in range(n))
    ok = (abs(total_w - n) < 1e-12 and np.allclose(total_x, expected, rtol=0, atol=1e-9)
          and not eng._sreqs and not eng._rreqs)
    assert _all_true(ok)


@pytest.mark.mpi
def test_close_waits_for_large_messages_matched_before_the_fin():
    """Large (rendezvous) messages pushed right before close(), never polled: a FIN may complete
    before them, and close() must still wait for every announced message (mass exact)."""
    comm = _world()
    topo = Topology.from_name("ring", comm.size)
    numel = 1 << 21                                    # 16 MiB of float64: never sent eagerly
    eng = GossipEngine(topo, numel, dtype=torch.float64, comm=comm, max_in_flight=2)
    ps = PushSum(torch.full((numel,), float(comm.rank + 1), dtype=torch.float64), 1.0)
    for t in range(3):
        share, w = ps.split(eng.out_degree(t))
        eng.push(share, w, version=t, step=t)
    for m in eng.close(timeout=DEADLINE_S):
        ps.absorb(m.data, m.weight)
    total_w = comm.allreduce(ps.w)
    total_x = comm.allreduce(float(ps.x[0]))
    assert total_w == pytest.approx(comm.size, abs=1e-12)
    assert total_x == pytest.approx(sum(range(1, comm.size + 1)), abs=1e-9)


@pytest.mark.mpi(min_size=2)
def test_ready_peers_skip_a_busy_link_and_keep_the_mass():
    """max_in_flight=1, rank 0 never polls during the steps: after at most two messages (one
    matched by its posted slot, one unmatched) its link is busy, so a push among ready_peers keeps
    that share home; advance() counts the pushes that found no link free. Mass stays exact."""
    comm = _world()
    rank, n = comm.rank, comm.size
    topo = Topology.from_name("complete", n)
    eng = GossipEngine(topo, 100, dtype=torch.float64, comm=comm, max_in_flight=1)
    ps = PushSum(torch.full((100,), float(rank + 1), dtype=torch.float64), 1.0)
    for step in range(30):
        peers = eng.ready_peers(step)
        if peers:
            share, w = ps.split(len(peers))
            eng.push(share, w, version=step, peers=peers)
        else:
            eng.advance(step)
        if rank != 0:
            for m in eng.poll():
                ps.absorb(m.data, m.weight)
    comm.Barrier()      # rank 0 stays deaf (no poll, no close) until every rank has stepped
    sent_to_0 = eng._sent.get(0, 0)
    version = eng.version
    for m in eng.close(timeout=DEADLINE_S):
        ps.absorb(m.data, m.weight)
    stats = comm.allgather((eng.stats(), sent_to_0, version))
    w_total = sum(comm.allgather(ps.w))
    x_total = sum(comm.allgather(float(ps.x.sum())))
    ok = (abs(w_total - n) < 1e-12 and abs(x_total - 100 * n * (n + 1) / 2) < 1e-9
          and all(s[1] <= 2 for s in stats[1:]) and all(s[2] == 29 for s in stats)
          and all(s[0]["replacements"] == 0 for s in stats)
          and sum(s[0]["messages_sent"] for s in stats) == sum(s[0]["messages_received"] for s in stats)
          and (n > 2 or stats[1][0]["skipped_pushes"] >= 27))
    assert _all_true(ok), stats
