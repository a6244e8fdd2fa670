"""Horovod's synthetic benchmark method, hpc_dgrab against Horovod: img/s and the ratio.

``python -m benchmarks horovod-synthetic --out DIR [--quick]`` writes ``DIR/horovod_synthetic.json``
and prints a table. It runs the method of Horovod's ``pytorch_synthetic_benchmark.py`` in our own
code, once per system in its own ``launch/local -n RANKS`` job with the same worker: a ResNet of
``benchmarks/resnet.py`` (``--model``, torchvision's layer counts), SGD with lr ``0.01 * size``,
``DistributedOptimizer(named_parameters=..., compression=Compression.fp16 or .none, op=Average)``,
``broadcast_parameters``/``broadcast_optimizer_state`` from rank 0, one fixed random batch of
``--batch-size`` images of ``--image`` x ``--image`` pixels per rank, ``--threads`` torch threads per
rank; ``--warmup`` untimed batches, then ``--iters`` timings of ``--batches-per-iter`` steps each.
A run's number is Horovod's "Total img/sec": ranks x the mean over iterations of this rank 0's
img/s. For each (ranks, fp16) the systems alternate, ``--rounds`` times, the order swapped every
round; a system's figure is the median over rounds; ``ratio`` = ours / Horovod's (> 1: we are
faster). The load average before and after is recorded: compare ratios, not img/s, on a shared
machine. Horovod missing: recorded as missing, ours still runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import timeit
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from benchmarks.checkout import child_env, horovod_available, import_horovod, mpi_command
from hpc_dgrab import fileio, procs
from hpc_dgrab.cli import ArgumentParser, UserError, positive_int, run_main, setup_logging

log = logging.getLogger(__name__)

NAME = "horovod-synthetic"
SYSTEMS = ("hpc_dgrab", "horovod")


# ------------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> int:
    """One system's run under mpirun (the benchmark's steps in its order): one JSON line on rank 0."""
    import torch
    import torch.nn.functional as F

    from benchmarks import resnet

    torch.set_num_threads(args.threads)
    if args.worker == "hpc_dgrab":
        import hpc_dgrab as hvd
    else:
        hvd = import_horovod()
    hvd.init()
    torch.manual_seed(hvd.rank())
    model = getattr(resnet, args.model)()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
    compression = hvd.Compression.fp16 if args.fp16 else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression, op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    data = torch.randn(args.batch_size, 3, args.image, args.image)
    target = torch.LongTensor(args.batch_size).random_() % 1000

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(data), target).backward()
        optimizer.step()

    timeit.timeit(step, number=args.warmup)
    img_secs = [args.batch_size * args.batches_per_iter / timeit.timeit(step, number=args.batches_per_iter)
                for _ in range(args.iters)]
    if hvd.rank() == 0:
        print(json.dumps({"system": args.worker, "ranks": hvd.size(), "fp16": bool(args.fp16),
                          "img_sec": hvd.size() * float(np.mean(img_secs)),
                          "img_sec_per_rank": [float(v) for v in img_secs]}), flush=True)
    return 0


# ------------------------------------------------------------------------------------------ driver
def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m benchmarks {NAME}", description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory for horovod_synthetic.json")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 ranks, 1 round, 1 iteration of 1 batch, 32x32 images, batch 4")
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   help="model (default: %(default)s)")
    p.add_argument("--ranks", default="2,4", help="rank counts (default: %(default)s)")
    p.add_argument("--fp16", default="off,on", help="fp16 all-reduce settings to run (default: %(default)s)")
    p.add_argument("--rounds", type=positive_int, default=2, help="alternations (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="per rank (default: %(default)s)")
    p.add_argument("--image", type=positive_int, default=64, help="image side, pixels (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads per rank (default: %(default)s)")
    p.add_argument("--warmup", type=positive_int, default=2, help="untimed batches (default: %(default)s)")
    p.add_argument("--batches-per-iter", type=positive_int, default=3, help="(default: %(default)s)")
    p.add_argument("--iters", type=positive_int, default=3, help="timed iterations (default: %(default)s)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="systems to run (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="debug logging")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--fp16-allreduce", dest="fp16_on", action="store_true", help=argparse.SUPPRESS)
    return p


def _worker_args(args: argparse.Namespace, system: str, fp16: bool) -> List[str]:
    out = ["--worker", system, "--model", args.model, "--batch-size", str(args.batch_size),
           "--image", str(args.image), "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--batches-per-iter", str(args.batches_per_iter), "--iters", str(args.iters)]
    return out + (["--fp16-allreduce"] if fp16 else [])


def run_system(args: argparse.Namespace, system: str, ranks: int, fp16: bool) -> Dict[str, Any]:
    """Launch one system's job; its JSON line, or ``{"error": ...}``."""
    cmd = mpi_command(ranks) + [sys.executable, "-m", "benchmarks.horovod_synthetic"] + \
        _worker_args(args, system, fp16)
    log.info("running %s", " ".join(cmd))
    try:
        proc = procs.run(cmd, env=child_env(), timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return dict(json.loads(lines[-1]))


def summarise(runs: List[Dict[str, Any]], systems: Sequence[str]) -> List[Dict[str, Any]]:
    rows = []
    for ranks, fp16 in sorted({(r["ranks"], r["fp16"]) for r in runs}):
        row: Dict[str, Any] = {"ranks": ranks, "fp16": fp16}
        for s in systems:
            ok = [r["img_sec"] for r in runs if (r["ranks"], r["fp16"], r["system"]) == (ranks, fp16, s)
                  and "img_sec" in r]
            row[s] = float(np.median(ok)) if ok else None
        ours, theirs = row.get("hpc_dgrab"), row.get("horovod")
        row["ratio"] = ours / theirs if ours and theirs else None
        rows.append(row)
    return rows


def _load() -> List[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        args.fp16 = args.fp16_on
        return worker(args)
    setup_logging(args.debug)
    if not args.out:
        raise UserError("--out DIR is required")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise UserError(f"unknown system {bad[0]!r}; choose from {', '.join(SYSTEMS)}")
    try:
        rank_counts = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        raise UserError("--ranks takes comma-separated numbers") from None
    fp16s = [{"off": False, "on": True}.get(v.strip()) for v in args.fp16.split(",")]
    if None in fp16s:
        raise UserError("--fp16 takes a comma-separated list of off/on")
    if args.quick:
        rank_counts, args.rounds, args.iters, args.batches_per_iter = [2], 1, 1, 1
        args.warmup, args.image, args.batch_size = 1, 32, 4
    missing = []
    if "horovod" in systems and not horovod_available():
        missing.append("horovod")
        systems.remove("horovod")
        log.warning("horovod does not import: recorded as missing")
    load_before = _load()
    runs: List[Dict[str, Any]] = []
    for ranks in rank_counts:
        for fp16 in fp16s:
            for rnd in range(args.rounds):
                for system in (systems if rnd % 2 == 0 else systems[::-1]):
                    res = run_system(args, system, ranks, bool(fp16))
                    res.update({"system": system, "ranks": ranks, "fp16": bool(fp16), "round": rnd})
                    runs.append(res)
                    log.info("%s", res)
    rows = summarise(runs, systems)
    settings = {k: getattr(args, k) for k in ("model", "batch_size", "image", "threads", "warmup",
                                              "batches_per_iter", "iters", "rounds")}
    result = {"benchmark": NAME, **settings, "cores": os.cpu_count(), "missing": missing,
              "load_before": load_before, "load_after": _load(),
              "note": "total img/s (ranks x rank 0's mean) per run, median over alternated rounds; "
                      "ratio = hpc_dgrab / Horovod (> 1: faster)",
              "summary": rows, "runs": runs}
    os.makedirs(args.out, exist_ok=True)
    fileio.write_json(os.path.join(args.out, "horovod_synthetic.json"), result)
    print(f"{'ranks':>5} {'fp16':>5} {'hpc_dgrab':>10} {'horovod':>10} {'ratio':>6}   img/s, {args.model}, "
          f"{args.image}x{args.image}, batch {args.batch_size}, load {load_before} -> {result['load_after']}")
    for r in rows:
        cells = " ".join(f"{r[s]:>10.1f}" if r.get(s) else f"{'-':>10}" for s in SYSTEMS)
        print(f"{r['ranks']:>5} {'on' if r['fp16'] else 'off':>5} {cells} "
              f"{r['ratio']:>6.3f}" if r["ratio"] else f"{r['ranks']:>5} {'on' if r['fp16'] else 'off':>5} "
              f"{cells} {'-':>6}")
    for m in missing:
        print(f"{m}: missing (does not import)")
    for e in (r for r in runs if "error" in r):
        print(f"failed: {e['system']} on {e['ranks']} ranks, fp16 {e['fp16']}: {e['error']}")
    return 0


if __name__ == "__main__":
    run_main(main)
