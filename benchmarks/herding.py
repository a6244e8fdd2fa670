"""Synthetic parallel herding: D-GraB (exact, parallel, parallel with half payloads) vs independent
PairBalance vs D-RR.

n workers hold m unit-norm Gaussian vectors each (d dimensions), centred per worker. Every round
each worker visits its vectors in its current order and balances them with the library's own
sorters (``hpc_dgrab.order``), simulated in one process: a worker's payload is summed over workers
exactly as the gradient all-reduce would. The herding bound of the resulting orders is
max over prefixes of ||running sum||_inf along the interleaved global order (position t of every
worker before position t+1), the prefixes taken at whole global steps (as in the D-GraB paper's
simulation; ``bound_all_prefixes`` also takes the prefixes inside a step). Lower is better.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from hpc_dgrab import fileio
from hpc_dgrab.cli import ArgumentParser, positive_int, run_main, setup_logging
from hpc_dgrab.order import make_sorter
from hpc_dgrab.order.balance import herding_bound

log = logging.getLogger(__name__)

METHODS = ("dgrab", "dgrab-parallel", "dgrab-parallel-half", "pairbalance", "rr")


def make_vectors(workers: int, per_worker: int, dim: int, seed: int) -> List[np.ndarray]:
    """Unit-norm Gaussian vectors, centred per worker: a list of (per_worker, dim) float64 arrays."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(workers):
        z = rng.normal(size=(per_worker, dim))
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        out.append(z - z.mean(0))
    return out


def _round(sorters: Sequence, vectors: Sequence[np.ndarray], method: str) -> None:
    """One epoch of every worker's sorter; payloads summed over workers like the all-reduce."""
    orders = [s.epoch_order() for s in sorters]
    m = len(orders[0])
    if method.startswith("dgrab-parallel"):  # one pair per worker per step: the protocol's pair-step
        steps = [(lo, lo + 2) for lo in range(0, m, 2)]
    elif method in ("dgrab", "pairbalance"):  # one step of all pairs: same result for exact/independent
        steps = [(0, m)]
    else:
        steps = []
    for lo, hi in steps:
        payloads = []
        for s, o, z in zip(sorters, orders, vectors):
            idx = o[lo:hi]
            payloads.append(s.observe(torch.from_numpy(z[idx]), [(int(i),) for i in idx]))
        if payloads[0] is not None:
            total = torch.stack(payloads).sum(0)
            for s in sorters:
                s.apply_payload(total)
    for s in sorters:
        s.end_epoch()


def run(workers: int, per_worker: int, dim: int, rounds: int, seed: int,
        methods: Sequence[str] = METHODS) -> Dict[str, Dict[str, List[float]]]:
    """Herding bounds per method after each round: ``{"bound": {method: [...]},
    "bound_all_prefixes": {method: [...]}}`` (lists of ``rounds`` floats)."""
    vectors = make_vectors(workers, per_worker, dim, seed)
    bounds: Dict[str, List[float]] = {}
    fine: Dict[str, List[float]] = {}
    for method in methods:
        name, opts = {"dgrab": ("dgrab", {"mode": "exact"}),
                      "dgrab-parallel": ("dgrab", {"mode": "parallel"}),
                      "dgrab-parallel-half": ("dgrab", {"mode": "parallel", "payload": "half"}),
                      "pairbalance": ("pairbalance", {}), "rr": ("rr", {})}[method]
        sorters = [make_sorter(name, per_worker, seed=seed, rank=j, world_size=workers, **opts)
                   for j in range(workers)]
        t0 = time.perf_counter()
        bounds[method], fine[method] = [], []
        for _ in range(rounds):
            _round(sorters, vectors, method)
            orders = [s.epoch_order() for s in sorters]
            bounds[method].append(herding_bound(vectors, orders))
            fine[method].append(herding_bound(vectors, orders, per_step=False))
        log.info("%s: %d rounds in %.1fs", method, rounds, time.perf_counter() - t0)
    return {"bound": bounds, "bound_all_prefixes": fine}


def plot(bounds: Dict[str, List[float]], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, values in bounds.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("round (epoch)")
    ax.set_ylabel("herding bound (max prefix inf-norm)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fileio.save_figure(fig, path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks herding", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=positive_int, default=32,
                   help="simulated workers (default: %(default)s)")
    p.add_argument("--per-worker", type=positive_int, default=500,
                   help="vectors per worker (default: %(default)s)")
    p.add_argument("--dim", type=positive_int, default=16, help="vector dimension d (default: %(default)s)")
    p.add_argument("--rounds", type=positive_int, default=10,
                   help="epochs of reordering (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the vectors (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--out", required=True, help="output directory (herding.json, herding.png)")
    p.add_argument("--debug", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.debug)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"--methods: unknown {','.join(bad) or '(none)'}; choose from {','.join(METHODS)}")
    t0 = time.perf_counter()
    res = run(args.workers, args.per_worker, args.dim, args.rounds, args.seed, methods)
    bounds = res["bound"]
    os.makedirs(args.out, exist_ok=True)
    result = {"benchmark": "herding", "workers": args.workers, "per_worker": args.per_worker, "dim": args.dim,
              "rounds": args.rounds, "seed": args.seed, "bound": bounds,
              "bound_all_prefixes": res["bound_all_prefixes"],
              "final": {m: v[-1] for m, v in bounds.items()}, "seconds": time.perf_counter() - t0}
    fileio.write_json(os.path.join(args.out, "herding.json"), result)
    plot(bounds, f"{args.workers} workers x {args.per_worker} vectors, d={args.dim}",
         os.path.join(args.out, "herding.png"))
    print(f"herding bound after {args.rounds} rounds "
          f"({args.workers} workers x {args.per_worker}, d={args.dim}):")
    for m, v in bounds.items():
        print(f"  {m:<16} {v[-1]:8.3f}   (round 1: {v[0]:.3f}; all prefixes: "
              f"{res['bound_all_prefixes'][m][-1]:.3f})")
    return 0


if __name__ == "__main__":
    run_main(main)
