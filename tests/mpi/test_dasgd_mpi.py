"""DASGD over push-sum gossip on 4 ranks: convergence on a quadratic (ring, exponential, one-peer
exponential, with a sleeping straggler), staleness zero in lock-step and = the injected delay,
mass conservation, and no hang when ranks finish at very different times."""
import time

import numpy as np
import pytest
import torch
from torch import nn

from hpc_dgrab import runtime
from hpc_dgrab.comm.gossip import GossipEngine
from hpc_dgrab.comm.topology import Topology
from hpc_dgrab.optim.dasgd import DASGD
from hpc_dgrab.optim.straggler import Straggler

pytestmark = pytest.mark.mpi

D = 6
H = torch.diag(torch.linspace(0.5, 2.0, D, dtype=torch.float64))   # strongly convex, L = 2
OPT = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)            # the known optimum


class Point(nn.Module):
    """The model is just a point w; 'forward' ignores its input."""

    def __init__(self, w0):
        super().__init__()
        self.w = nn.Parameter(w0.clone())

    def forward(self, x):
        return self.w


def quad_loss(w, target):
    diff = w - target
    return 0.5 * diff @ H @ diff


def _driver(topo_name, w0, lr=0.3, straggler=None, when_busy="skip"):
    comm = runtime.world()
    topo = Topology.from_name(topo_name, comm.size)
    model = Point(w0)
    eng = GossipEngine(topo, D, dtype=torch.float64, comm=comm)
    return DASGD(model, torch.optim.SGD(model.parameters(), lr=lr), quad_loss, eng, straggler=straggler,
                 when_busy=when_busy)


def _start(rank):
    return torch.full((D,), 5.0 * (rank + 1), dtype=torch.float64) * (-1) ** rank


@pytest.mark.timeout(60)
@pytest.mark.parametrize("topo_name", ["ring", "exponential", "one-peer-exponential"])
@pytest.mark.parametrize("slow", [False, True])
def test_quadratic_every_rank_reaches_optimum(topo_name, slow):
    comm = runtime.world()
    straggler = Straggler(3.0) if slow and comm.rank == 1 else None
    drv = _driver(topo_name, _start(comm.rank), lr=0.6, straggler=straggler)
    for _ in range(300):  # local contraction <= 0.7 per step; staleness slows it, 300 is ample
        drv.step(None, OPT)
        if straggler is not None:  # compute of a 6-vector is ~us: make the 3x sleep visible
            straggler.idle(2e-3)
    stats = drv.finish(timeout=40)
    err = float((drv.model.w.detach() - OPT).abs().max())
    avg_err = float((drv.average() - OPT).abs().max())
    weights = comm.allgather(drv.ps.w)
    errs = comm.allgather((err, avg_err, stats["staleness_max"]))
    assert abs(sum(weights) - comm.size) < 1e-12           # push-sum mass conserved exactly
    for e, a, _ in errs:
        assert e < 1e-6 and a < 1e-6, errs


def _lockstep(drv, comm, steps, deaf_from=None, deaf_for=0):
    """Every step: compute, push, barrier, then wait until a share of version >= step has arrived
    from every in-neighbour of this step (a test harness; DASGD itself never waits). The rank
    ``deaf_from`` does not poll during steps [deaf_from[1], deaf_from[1] + deaf_for), nor in the
    closing barrier of the step before: a neighbour that leaves that barrier first may already
    push the gap's first share, which the deaf rank must not merge before the gap.

    The barriers are non-blocking and keep polling (except on a deaf rank): a rank whose sends
    to a deaf neighbour hit the in-flight bound holds the newest share as pending, and only its own
    poll() posts it once the neighbour listens again — a blocking barrier would starve that."""
    topo = drv.engine.topology
    latest = {}

    def listen():
        for m in drv.engine.poll():
            drv.absorb([m])
            latest[m.sender] = max(latest.get(m.sender, -1), m.version)

    def barrier(deaf):
        req, t0 = comm.Ibarrier(), time.monotonic()
        while not req.Test():
            if not deaf:
                listen()
            assert time.monotonic() - t0 < 20, "lock-step harness timed out in a barrier"

    def deaf_at(t):
        return deaf_from is not None and comm.rank == deaf_from[0] and deaf_from[1] <= t + 1 < deaf_from[1] + deaf_for

    for t in range(steps):
        drv.compute(None, OPT)
        drv.push()
        deaf = deaf_at(t)
        barrier(deaf)
        if not deaf:
            need = topo.in_neighbors(comm.rank, t + 1)
            t0 = time.monotonic()
            while not all(latest.get(j, -1) >= t + 1 for j in need):
                listen()
                assert time.monotonic() - t0 < 20, "lock-step harness timed out"
        barrier(deaf or deaf_at(t + 1))


@pytest.mark.timeout(60)
def test_staleness_zero_in_lockstep_and_equal_to_injected_delay():
    comm = runtime.world()
    # a busy link's share waits as pending (not kept home), so every step reaches every neighbour
    drv = _driver("ring", _start(comm.rank), when_busy="queue")
    _lockstep(drv, comm, 12)
    lock = drv.staleness.snapshot()
    drv.finish(timeout=30)
    # second run: rank 2 stops polling for DELAY steps, from step 5 on
    delay = 4
    drv2 = _driver("ring", _start(comm.rank), when_busy="queue")
    _lockstep(drv2, comm, 14, deaf_from=(2, 5), deaf_for=delay)
    delayed = drv2.staleness.snapshot()
    drv2.finish(timeout=30)
    table = comm.allgather((lock, delayed))
    for r, (lk, dl) in enumerate(table):
        assert lk["count"] >= 2 * 12 and lk["max"] == 0 and lk["total"] == 0   # lock-step: 0
        if r == 2:
            # the oldest share it merges after the gap was pushed when the gap began: exactly DELAY
            # steps behind; nothing can be older (its neighbours pushed every step).
            assert dl["max"] == delay and dl["total"] > 0
        else:
            assert dl["max"] == 0


@pytest.mark.timeout(60)
def test_no_hang_when_ranks_finish_at_different_times():
    comm = runtime.world()
    drv = _driver("one-peer-exponential", _start(comm.rank), lr=0.1)
    t0 = time.monotonic()
    for _ in range(5 + 40 * comm.rank):     # rank 0: 5 steps, rank 3: 125 steps
        drv.step(None, OPT)
        time.sleep(1e-3)
    stats = drv.finish(timeout=30)
    elapsed = time.monotonic() - t0
    out = comm.allgather((drv.steps, drv.ps.w, elapsed, float(drv.ps.x.sum()), stats["messages_received"]))
    assert [o[0] for o in out] == [5 + 40 * r for r in range(comm.size)]
    assert abs(sum(o[1] for o in out) - comm.size) < 1e-12
    # finished ranks serve (pass mass back) until the last one is done: without that, rank 3 would
    # keep half of its weight per step for its last 40 steps alone, 0.5^40 ~ 1e-12
    assert min(o[1] for o in out) > 1e-4, [o[1] for o in out]
    assert all(o[2] < 30 for o in out)
    assert all(np.isfinite(o[3]) for o in out)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("topo_name", ["ring", "one-peer-exponential"])
@pytest.mark.parametrize("when_busy", ["skip", "queue"])
def test_push_writes_the_same_bits_as_push_sum_split_and_absorb(topo_name, when_busy):
    """DASGD writes its share straight into the engine's message buffer and keeps it as its own share;
    a plain PushSum fed the same step, split and messages holds the same bits (float32, no tolerance)."""
    from hpc_dgrab.comm.gossip import PushSum

    comm = runtime.world()
    topo = Topology.from_name(topo_name, comm.size)
    gen = torch.Generator().manual_seed(comm.rank)
    model = Point(torch.randn(D, generator=gen, dtype=torch.float64).float() * 3)
    eng = GossipEngine(topo, D, dtype=torch.float32, comm=comm)
    drv = DASGD(model, torch.optim.SGD(model.parameters(), lr=0.1),
                lambda w, t: ((w - t) ** 2).sum(), eng, when_busy=when_busy)
    ref = PushSum(drv.ps.x.clone(), 1.0)
    target = OPT.float()
    same, arrived = True, 0
    for step in range(1, 61):
        drv.compute(None, target)
        ref.x.copy_(model.w.detach()).mul_(ref.w)
        same &= torch.equal(drv.ps.numerator, ref.x)
        k = drv.push()
        if k:
            ref.split(k)
        msgs = eng.poll()
        for m in msgs:
            ref.absorb(m.data, m.weight)
        drv.absorb(msgs)
        arrived += len(msgs)
        same &= torch.equal(drv.ps.numerator, ref.x) and drv.ps.w == ref.w
        if msgs:
            same &= torch.equal(model.w.detach(), ref.value())
        if step % 10 == 0:
            comm.Barrier()
    drv.finish(timeout=40)
    table = comm.allgather((bool(same), arrived))
    assert all(s for s, _ in table) and sum(a for _, a in table) > 0, table
