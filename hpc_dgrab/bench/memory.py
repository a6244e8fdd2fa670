"""Peak memory per rank of each sync mode, compressor and order, beyond the model's own bytes.

``python -m hpc_dgrab.bench memory --out DIR [--quick] [--ranks R] [--params 1e6,1e7]`` launches,
for every configuration, ``launch/local -n R`` child processes (this module with ``--child``) that
build an MLP of about P float32 parameters (Linear(256, h), ReLU, Linear(h, 10)), run a few
training steps of the real driver (SyncSGD with the dense all-reduce or a compressed all-gather and
the sorter; DASGD over gossip on a ring) with momentum SGD on a batch of 32 random examples, and
report, per rank, the resident set size after imports and MPI start (``baseline``) and the peak
(``ru_maxrss``). ``overhead_bytes = peak - baseline - model bytes`` is what the method costs on top
of the model (gradients, optimizer state, exchange buffers, error memory, running sums, messages);
``overhead_x_model`` divides it by the model bytes. The goal is at most 4x the model bytes plus the
data (the batch here is 32 KiB). Writes ``DIR/memory.json`` and prints a table; ``--quick`` runs
two configurations at 1e5 parameters (a smoke test).
"""
from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from hpc_dgrab import fileio, runtime
from hpc_dgrab.cli import ArgumentParser, UserError, positive_int, run_main

log = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: (sync, compress, order) configurations of the full run
CONFIGS = [("allreduce", "none", "rr"), ("allreduce", "none", "dgrab"), ("allreduce", "topk", "rr"),
           ("allreduce", "regtopk", "rr"), ("allreduce", "regtopk", "dgrab"), ("gossip", "none", "rr")]
QUICK = [("allreduce", "none", "dgrab"), ("gossip", "none", "rr")]
IN_FEATURES, CLASSES, BATCH = 256, 10, 32
GOAL_X = 4.0


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(params: int, sync: str, compress: str, order: str, steps: int) -> Dict[str, Any]:
    """One rank's measurement (runs under mpirun): the configuration once with a tiny model (so the
    libraries' lazily loaded code and buffers are resident), the baseline, then at ``params``."""
    import torch

    torch.set_num_threads(1)
    comm = runtime.world()
    _train(comm, 2000, sync, compress, order, steps)
    comm.Barrier()
    baseline = _rss_bytes()
    numel, data_bytes = _train(comm, params, sync, compress, order, steps)
    comm.Barrier()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = numel * 4
    return {"rank": comm.rank, "params": numel, "model_bytes": model_bytes, "baseline_rss": baseline,
            "peak_rss": peak, "overhead_bytes": peak - baseline - model_bytes,
            "overhead_x_model": (peak - baseline - model_bytes) / model_bytes, "data_bytes": data_bytes}


def _train(comm: Any, params: int, sync: str, compress: str, order: str, steps: int) -> "tuple[int, int]":
    """A few steps of the configuration on a fresh MLP of about ``params`` parameters."""
    import torch
    from torch import nn

    from hpc_dgrab.comm.collectives import get_backend
    from hpc_dgrab.comm.gossip import GossipEngine
    from hpc_dgrab.comm.topology import Topology
    from hpc_dgrab.optim.dasgd import DASGD
    from hpc_dgrab.optim.sync_sgd import DenseExchanger, SyncSGD
    from hpc_dgrab.order import make_sorter

    rank, size = comm.rank, comm.size
    hidden = max(1, round((params - CLASSES) / (IN_FEATURES + 1 + CLASSES)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))
    numel = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(steps * BATCH, IN_FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (steps * BATCH,), generator=gen)
    ce = nn.functional.cross_entropy
    if sync == "gossip":
        engine = GossipEngine(Topology.from_name("ring", size), numel, dtype=torch.float32, comm=comm)
        driver = DASGD(model, opt, ce, engine)
        for k in range(steps):
            driver.step(x[k * BATCH:(k + 1) * BATCH], y[k * BATCH:(k + 1) * BATCH])
        driver.finish()
    else:
        if compress == "none":
            exchanger: Any = DenseExchanger(get_backend("mpi", comm).allreduce_, size)
        else:
            from hpc_dgrab.compress import MPICommunicator, make_exchanger

            exchanger = make_exchanger(compress, None, size, MPICommunicator(comm), density=0.01)
        sync_driver = SyncSGD(model, opt, ce, exchanger)
        sorter = make_sorter(order, len(x), seed=0, rank=rank, world_size=size)
        idx = sorter.epoch_order()
        for k in range(steps):
            i = idx[k * BATCH:(k + 1) * BATCH]
            sync_driver.step(x[i], y[i], sorter=sorter, indices=i)
    return numel, int(x.numel() * 4 + y.numel() * 8)


def run_config(params: int, sync: str, compress: str, order: str, ranks: int, steps: int,
               timeout: float) -> Dict[str, Any]:
    cmd = [os.path.join(ROOT, "launch", "local"), "-n", str(ranks), "--", sys.executable, "-m",
           "hpc_dgrab.bench.memory", "--child", "--params", str(params), "--sync", sync,
           "--compress", compress, "--order", order, "--steps", str(steps), "--out", "-"]
    proc = subprocess.run(cmd, cwd=ROOT, env=runtime.child_env(ROOT), capture_output=True, text=True,
                          timeout=timeout)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(rows) != ranks:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"memory child {sync}/{compress}/{order} at {params} failed ({tail})")
    worst = max(rows, key=lambda r: r["overhead_bytes"])
    return {"sync": sync, "compress": compress, "order": order, "params": worst["params"],
            "model_bytes": worst["model_bytes"], "data_bytes": worst["data_bytes"],
            "baseline_rss": worst["baseline_rss"], "peak_rss": max(r["peak_rss"] for r in rows),
            "overhead_bytes": worst["overhead_bytes"], "overhead_x_model": worst["overhead_x_model"],
            "per_rank_overhead_x_model": [round(r["overhead_x_model"], 3) for r in rows]}


def _params(text: str) -> List[int]:
    try:
        vals = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1000:
        raise UserError(f"--params: expected comma-separated counts >= 1000, got {text!r}")
    return vals


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m hpc_dgrab.bench memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (memory.json)")
    p.add_argument("--quick", action="store_true", help="two configurations at 1e5 parameters")
    p.add_argument("--ranks", type=positive_int, default=2)
    p.add_argument("--params", default=None, help="comma-separated parameter counts (default 1e6,1e7)")
    p.add_argument("--steps", type=positive_int, default=4, help="training steps per child")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per child run")
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--sync", default="allreduce", choices=("allreduce", "gossip"), help=argparse_hidden())
    p.add_argument("--compress", default="none", choices=("none", "topk", "regtopk"), help=argparse_hidden())
    p.add_argument("--order", default="rr", choices=("rr", "dgrab"), help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child:
        row = child(_params(args.params or "1e5")[0], args.sync, args.compress, args.order, args.steps)
        sys.stdout.write(json.dumps(row) + "\n")
        return 0
    sizes = _params(args.params) if args.params else ([100_000] if args.quick else [1_000_000, 10_000_000])
    configs = QUICK if args.quick else CONFIGS
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for n in sizes:
        for sync, compress, order in configs:
            rows.append(run_config(n, sync, compress, order, args.ranks, args.steps, args.timeout))
            r = rows[-1]
            log.info("%s/%s/%s %d params: overhead %.2fx model", sync, compress, order, n,
                     r["overhead_x_model"])
    worst = max(r["overhead_x_model"] for r in rows)
    result = {"benchmark": "memory", "ranks": args.ranks, "steps": args.steps, "batch": BATCH,
              "model": f"MLP Linear({IN_FEATURES}, h), ReLU, Linear(h, {CLASSES}), float32, momentum SGD",
              "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
              "goals": {"overhead_vs_model": {"value": worst, "rule": f"<= {GOAL_X}x model bytes plus data",
                                              "met": worst <= GOAL_X}}}
    fileio.write_json(os.path.join(args.out, "memory.json"), result)
    print(f"{'sync':<10} {'compress':<8} {'order':<6} {'params':>9} {'model MB':>9} {'peak MB':>8} "
          f"{'overhead MB':>12} {'x model':>8}")
    for r in rows:
        print(f"{r['sync']:<10} {r['compress']:<8} {r['order']:<6} {r['params']:>9} "
              f"{r['model_bytes'] / 2**20:>9.1f} {r['peak_rss'] / 2**20:>8.1f} "
              f"{r['overhead_bytes'] / 2**20:>12.1f} {r['overhead_x_model']:>8.2f}")
    g = result["goals"]["overhead_vs_model"]
    print(f"goal overhead <= {GOAL_X}x model: worst {g['value']:.2f}x -> {'met' if g['met'] else 'MISSED'}")
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    run_main(main)
