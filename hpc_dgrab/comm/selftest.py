"""Gossip self-test: asynchronous push-sum with random sleeps, then close and check conservation.

``mpirun -n N python -m hpc_dgrab.comm.selftest [--steps 10000] [--topology one-peer-exponential]``
Each rank runs a different number of steps (``steps - 7 * rank``), sleeps a random few
microseconds in some steps, merges whatever arrived, closes, and checks on every rank that nothing
leaked and that the push-sum mass is conserved (sum of weights == n, sum of numerators == the sum
of the initial values). Rank 0 prints one JSON line with the totals and ``"ok": true|false``; the
exit code is 0 only when everything held (2 for bad arguments). Used by the 8-rank stress test;
useful on a new cluster.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from hpc_dgrab import runtime
from hpc_dgrab.comm.gossip import GossipEngine, PushSum
from hpc_dgrab.comm.topology import Topology

log = logging.getLogger(__name__)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc_dgrab.comm.selftest",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000, help="steps of rank 0 (> 0)")
    parser.add_argument("--topology", default="one-peer-exponential", help="a topology name")
    parser.add_argument("--numel", type=int, default=16, help="elements per message (> 0)")
    parser.add_argument("--max-in-flight", type=int, default=2, help="sends in flight per peer (> 0)")
    parser.add_argument("--sleep-us", type=float, default=30.0,
                        help="upper bound of the random sleep in a sleeping step (microseconds, >= 0)")
    parser.add_argument("--sleep-prob", type=float, default=0.3, help="share of steps that sleep (>= 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the topology and the sleeps")
    args = parser.parse_args(argv)
    for name in ("steps", "numel", "max_in_flight"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be an integer > 0")
    if not (args.sleep_us >= 0 and args.sleep_prob >= 0):
        parser.error("--sleep-us and --sleep-prob must be >= 0")

    comm = runtime.world()
    rank, n = comm.rank, comm.size
    topo = Topology.from_name(args.topology, n, seed=args.seed)
    rng = random.Random(args.seed * 1000 + rank)
    x0 = torch.arange(args.numel, dtype=torch.float64) + 100.0 * rank
    ps = PushSum(x0.clone(), 1.0)
    eng = GossipEngine(topo, args.numel, dtype=torch.float64, comm=comm, max_in_flight=args.max_in_flight)
    steps = max(1, args.steps - 7 * rank)
    start = time.perf_counter()
    for step in range(steps):
        if rng.random() < args.sleep_prob:
            time.sleep(rng.random() * args.sleep_us * 1e-6)
        share, w = ps.split(eng.out_degree(step))
        eng.push(share, w, version=step, step=step)
        for m in eng.poll():
            ps.absorb(m.data, m.weight)
    stepped = time.perf_counter() - start
    for m in eng.close(timeout=120.0):
        ps.absorb(m.data, m.weight)
    elapsed = time.perf_counter() - start
    stats = eng.stats()
    leaked = len(eng._sreqs) + len(eng._rreqs)

    local = np.array([ps.w, stats["messages_sent"], stats["messages_received"], leaked,
                      stats["replacements"], stats["staleness_max"], stats["staleness_avg"]],
                     dtype=np.float64)
    table = np.empty((n, local.size))
    comm.Allgather(local, table)
    sums = np.empty((n, args.numel))
    comm.Allgather(ps.x.numpy(), sums)
    total_x = sums.sum(axis=0)
    expected_x = np.sum([np.arange(args.numel, dtype=np.float64) + 100.0 * r for r in range(n)], axis=0)
    weight_sum = float(table[:, 0].sum())
    result = {
        "ranks": n, "topology": topo.name, "steps_per_rank": [max(1, args.steps - 7 * r) for r in range(n)],
        "weight_sum": weight_sum, "weight_error": abs(weight_sum - n),
        "numerator_error": float(np.abs(total_x - expected_x).max()),
        "messages_sent": int(table[:, 1].sum()), "messages_received": int(table[:, 2].sum()),
        "leaked_requests": int(table[:, 3].sum()), "replacements": int(table[:, 4].sum()),
        "staleness_max": int(table[:, 5].max()), "staleness_avg_mean": float(table[:, 6].mean()),
        "step_phase_s": round(stepped, 3), "total_s": round(elapsed, 3),
    }
    result["ok"] = bool(result["weight_error"] < 1e-9 * n
                        and result["numerator_error"] < 1e-6 * abs(expected_x).max()
                        and result["messages_sent"] == result["messages_received"]
                        and result["leaked_requests"] == 0)
    if rank == 0:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
