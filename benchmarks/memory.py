"""Peak memory per rank of each sync mode, compressor and order, beyond the model's own bytes.

``python -m benchmarks memory --out DIR [--quick] [--ranks R] [--params 1e6,1e7]
[--configs SYNC/COMPRESS/ORDER,...]`` launches, for every configuration, ``launch/local -n R``
child processes (this module with ``--child``) that build an MLP of about P float32 parameters
(Linear(256, h), ReLU, Linear(h, 10)) and run a few steps of momentum SGD (batch 32 of random
examples) the way the trainer runs them. The ``plain`` row is the reference: the same steps of
plain PyTorch in each process (no communication; what any training costs: the gradients, the
momentum, the batch's activations). The all-reduce rows are the user's loop of the public API
(``DistributedOptimizer``, with ``compression=TopK/RegTopK(density=0.01)``, and an
``OrderedSampler`` of order ``rr`` or ``dgrab`` whose order data rides in the payload channel);
the gossip row is the user's loop of ``GossipOptimizer`` (DASGD over push-sum on a ring).

Per rank it reports the resident set size after a warm-up run of the same configuration on a tiny
model (``baseline``: the libraries' code and lazily created buffers), the peak (``ru_maxrss``)
and the resident size after the last step. ``overhead_bytes = peak - baseline - model bytes`` is
what the method costs on top of the model (gradients, optimizer state, exchange buffers, error
memory, running sums, messages, and transient copies); ``overhead_x_model`` divides it by the
model bytes; ``held_x_model`` itemises the buffers the optimizer keeps between steps (its
gradient buckets, compression state, momentum). The goal is at most 4x the model bytes plus the
data (the batch here is 32 KiB); ``goals`` says met/missed per configuration. Writes
``DIR/memory.json`` and prints a table; ``--quick`` runs two configurations at 1e5 parameters
(a smoke test). By default glibc's mmap threshold adapts (up to 32 MiB): a freed block below it
stays in the heap, so a model of a few MB shows the allocator's retention as well as our buffers;
``--mmap-threshold 262144`` fixes it and shows the buffers alone.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.checkout import ROOT, child_env, launcher
from hpc_dgrab import fileio
from hpc_dgrab.cli import ArgumentParser, UserError, positive_int, run_main

log = logging.getLogger(__name__)

#: (sync, compress, order) configurations of the full run
CONFIGS = [("plain", "none", "rr"), ("allreduce", "none", "rr"), ("allreduce", "none", "dgrab"),
           ("allreduce", "topk", "rr"),
           ("allreduce", "regtopk", "rr"), ("allreduce", "regtopk", "dgrab"), ("gossip", "none", "rr")]
QUICK = [("allreduce", "regtopk", "dgrab"), ("gossip", "none", "rr")]
IN_FEATURES, CLASSES, BATCH = 256, 10, 32
DENSITY = 0.01
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
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    _train(comm, 2000, sync, compress, order, steps)
    comm.Barrier()
    baseline = _rss_bytes()
    numel, data_bytes, held = _train(comm, params, sync, compress, order, steps)
    comm.Barrier()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = numel * 4
    return {"rank": comm.rank, "params": numel, "model_bytes": model_bytes, "baseline_rss": baseline,
            "peak_rss": peak, "overhead_bytes": peak - baseline - model_bytes,
            "overhead_x_model": (peak - baseline - model_bytes) / model_bytes, "data_bytes": data_bytes,
            "resident_bytes": held.pop("resident") - baseline - model_bytes,
            "held_x_model": {k: round(v / model_bytes, 3) for k, v in held.items()}}


def _train(comm: Any, params: int, sync: str, compress: str, order: str, steps: int
           ) -> tuple[int, int, Dict[str, int]]:
    """A few steps of the configuration on a fresh MLP of about ``params`` parameters, the way the
    trainer runs it; returns (parameters, data bytes, bytes held after the steps by purpose)."""
    import torch
    from torch import nn

    rank = comm.rank
    hidden = max(1, round((params - CLASSES) / (IN_FEATURES + 1 + CLASSES)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))
    numel = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(steps * BATCH, IN_FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (steps * BATCH,), generator=gen)
    data_bytes = int(x.numel() * 4 + y.numel() * 8)
    if sync == "plain":
        held = _plain(model, opt, x, y, steps)
    elif sync == "gossip":
        held = _gossip(comm, model, opt, x, y, steps)
    else:
        held = _allreduce(comm, model, opt, compress, order, x, y, steps)
    held["momentum"] = sum(s["momentum_buffer"].nbytes for s in opt.state.values()
                           if s.get("momentum_buffer") is not None)
    return numel, data_bytes, held


def _plain(model: Any, opt: Any, x: Any, y: Any, steps: int) -> Dict[str, int]:
    """The reference: the same steps of plain PyTorch in each process, no communication at all."""
    from torch import nn

    for k in range(steps):
        sl = slice(k * BATCH, (k + 1) * BATCH)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
        opt.step()
    return {"resident": _rss_bytes(), "gradients": sum(p.grad.nbytes for p in model.parameters()
                                                       if p.grad is not None)}


def _allreduce(comm: Any, model: Any, opt: Any, compress: str, order: str, x: Any, y: Any,
               steps: int) -> Dict[str, int]:
    """The user's loop of the public API: DistributedOptimizer (+ compression) and OrderedSampler."""
    from torch import nn

    import hpc_dgrab as hd

    hd.init(comm)
    compression = {"none": None, "topk": hd.TopK(density=DENSITY),
                   "regtopk": hd.RegTopK(density=DENSITY)}[compress]
    sampler = hd.OrderedSampler(len(x), order=order, batch_size=BATCH)
    dopt = hd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=compression, sampler=sampler)
    sampler.set_epoch(0)
    order_idx = sampler.order()
    for k in range(steps):
        i = order_idx[k * BATCH:(k + 1) * BATCH]
        dopt.zero_grad()
        sampler.backward(model, nn.functional.cross_entropy, x[i], y[i], indices=i)
        dopt.step()
    held = {"resident": _rss_bytes(), **dopt.buffer_bytes()}
    dopt.remove_hooks()
    return held


def _gossip(comm: Any, model: Any, opt: Any, x: Any, y: Any, steps: int) -> Dict[str, int]:
    """The user's loop of ``hd.GossipOptimizer`` (DASGD over push-sum on a ring; what ``--sync gossip``
    of the trainer wraps)."""
    from torch import nn

    import hpc_dgrab as hd

    hd.init(comm)
    gopt = hd.GossipOptimizer(opt, model, topology="ring")
    for k in range(steps):
        sl = slice(k * BATCH, (k + 1) * BATCH)
        gopt.zero_grad()
        nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
        gopt.step()
    held = {"resident": _rss_bytes()}
    gopt.finish()
    return held


def run_config(params: int, sync: str, compress: str, order: str, ranks: int, steps: int,
               timeout: float, mmap_threshold: Optional[int] = None) -> Dict[str, Any]:
    cmd = [launcher("local"), "-n", str(ranks), "--", sys.executable, "-m",
           "benchmarks.memory", "--child", "--params", str(params), "--sync", sync,
           "--compress", compress, "--order", order, "--steps", str(steps), "--out", "-"]
    env = child_env()
    if mmap_threshold is not None:   # glibc: blocks from this size on are mapped, and unmapped when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(rows) != ranks:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"memory child {sync}/{compress}/{order} at {params} failed ({tail})")
    worst = max(rows, key=lambda r: r["overhead_bytes"])
    return {"sync": sync, "compress": compress, "order": order, "params": worst["params"],
            "model_bytes": worst["model_bytes"], "data_bytes": worst["data_bytes"],
            "baseline_rss": worst["baseline_rss"], "peak_rss": max(r["peak_rss"] for r in rows),
            "overhead_bytes": worst["overhead_bytes"], "overhead_x_model": worst["overhead_x_model"],
            "per_rank_overhead_x_model": [round(r["overhead_x_model"], 3) for r in rows],
            "resident_x_model": round(worst["resident_bytes"] / worst["model_bytes"], 3),
            "held_x_model": worst["held_x_model"]}


def _params(text: str) -> List[int]:
    try:
        vals = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1000:
        raise UserError(f"--params: expected comma-separated counts >= 1000, got {text!r}")
    return vals


def _configs(text: str) -> List[Tuple[str, str, str]]:
    out = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        parts = tuple(item.split("/"))
        if parts not in CONFIGS:
            raise UserError(f"--configs: unknown configuration {item!r}; choose from "
                            + ", ".join("/".join(c) for c in CONFIGS))
        out.append(parts)
    if not out:
        raise UserError("--configs: give at least one SYNC/COMPRESS/ORDER")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (memory.json)")
    p.add_argument("--quick", action="store_true", help="two configurations at 1e5 parameters")
    p.add_argument("--ranks", type=positive_int, default=2, help="MPI ranks (default: %(default)s)")
    p.add_argument("--params", default=None, help="comma-separated parameter counts (default 1e6,1e7)")
    p.add_argument("--steps", type=positive_int, default=4, help="training steps per child")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per child run")
    p.add_argument("--mmap-threshold", type=positive_int, default=None, metavar="BYTES",
                   help="run the ranks with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (fixed: freed large "
                        "blocks go back to the system at once instead of staying in the heap)")
    p.add_argument("--configs", default=None,
                   help="comma-separated SYNC/COMPRESS/ORDER to run (default: all, e.g. allreduce/topk/rr)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sync", default="allreduce", choices=("plain", "allreduce", "gossip"),
                   help=argparse.SUPPRESS)
    p.add_argument("--compress", default="none", choices=("none", "topk", "regtopk"), help=argparse.SUPPRESS)
    p.add_argument("--order", default="rr", choices=("rr", "dgrab"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        row = child(_params(args.params or "1e5")[0], args.sync, args.compress, args.order, args.steps)
        sys.stdout.write(json.dumps(row) + "\n")
        return 0
    sizes = _params(args.params) if args.params else ([100_000] if args.quick else [1_000_000, 10_000_000])
    configs = _configs(args.configs) if args.configs else (QUICK if args.quick else CONFIGS)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for n in sizes:
        for sync, compress, order in configs:
            rows.append(run_config(n, sync, compress, order, args.ranks, args.steps, args.timeout,
                                   args.mmap_threshold))
            r = rows[-1]
            log.info("%s/%s/%s %d params: overhead %.2fx model", sync, compress, order, n,
                     r["overhead_x_model"])
    goals = {}
    for r in rows:
        r["goal_met"] = r["overhead_bytes"] <= GOAL_X * r["model_bytes"] + r["data_bytes"]
        goals[f"{r['sync']}/{r['compress']}/{r['order']}@{r['params']}"] = {
            "value": round(r["overhead_x_model"], 3), "met": r["goal_met"]}
    worst = max(r["overhead_x_model"] for r in rows)
    rule = f"<= {GOAL_X}x model bytes plus data"
    result = {"benchmark": "memory", "ranks": args.ranks, "steps": args.steps, "batch": BATCH,
              "density": DENSITY, "malloc_mmap_threshold": args.mmap_threshold,
              "model": f"MLP Linear({IN_FEATURES}, h), ReLU, Linear(h, {CLASSES}), float32, momentum SGD",
              "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
              "goals": {"overhead_vs_model": {"value": worst, "rule": rule,
                                              "met": all(r["goal_met"] for r in rows)},
                        "per_config": {"rule": rule, **goals}}}
    fileio.write_json(os.path.join(args.out, "memory.json"), result)
    print(f"{'sync':<10} {'compress':<8} {'order':<6} {'params':>9} {'model MB':>9} {'peak MB':>8} "
          f"{'overhead MB':>12} {'x model':>8} {'held x':>7}  goal   held between steps (x model)")
    for r in rows:
        held = ", ".join(f"{k} {v:.2f}" for k, v in r["held_x_model"].items())
        print(f"{r['sync']:<10} {r['compress']:<8} {r['order']:<6} {r['params']:>9} "
              f"{r['model_bytes'] / 2**20:>9.1f} {r['peak_rss'] / 2**20:>8.1f} "
              f"{r['overhead_bytes'] / 2**20:>12.1f} {r['overhead_x_model']:>8.2f} "
              f"{r['resident_x_model']:>7.2f}  "
              f"{'met   ' if r['goal_met'] else 'MISSED'} {held}")
    g = result["goals"]["overhead_vs_model"]
    print(f"goal overhead {rule}: worst {g['value']:.2f}x -> {'met' if g['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    run_main(main)
