"""DistributedOptimizer vs Horovod's DistributedOptimizer vs torch DDP (gloo): synchronous step time.

``python -m benchmarks peers --out DIR [--quick]`` writes ``DIR/peers.json`` and ``DIR/peers.png``
and prints a table. For every (ranks, model size) it launches each system in its own processes
(``launch/local -n RANKS``), one after another, and repeats the round ``--repeats`` times with the
order of the systems rotated, so that machine noise hits all of them alike:

* ``hpc_dgrab``: ``hpc_dgrab.DistributedOptimizer`` (MPI, bucketed all-reduce from gradient hooks);
* ``hpc_dgrab+regtopk``: the same with ``compression=RegTopK(density=--density)``;
* ``hpc_dgrab-gloo``: ``hpc_dgrab.DistributedOptimizer(backend="gloo")`` (the torch.distributed transport);
* ``horovod``: ``horovod.torch.DistributedOptimizer`` (recorded as missing when Horovod does not import);
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` over gloo on 127.0.0.1, ranks from MPI.

The model is an MLP ``in -> h -> h -> 10`` with ``h`` chosen for about 1e5, 1e6 and 1e7 parameters,
float32, SGD with momentum, a fixed random batch of ``--batch-size`` examples per rank, one torch
thread per rank. A step is ``zero_grad; forward; backward; step``; its time is the slowest rank's.
Each run reports the median over its timed steps (after warm-up steps); a system's number for a
setting is the median over the repeats. ``ratio`` = our median / the best peer's median (< 1: we are
faster). On a shared machine compare ratios, not seconds.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from benchmarks.checkout import child_env, horovod_available, import_horovod, mpi_command
from hpc_dgrab import fileio, procs
from hpc_dgrab.cli import ArgumentParser, UserError, positive_int, run_main, setup_logging

log = logging.getLogger(__name__)

NAME = "peers"
SYSTEMS = ("hpc_dgrab", "hpc_dgrab+regtopk", "hpc_dgrab-gloo", "horovod", "ddp")
PEERS = ("horovod", "ddp")
IN_FEATURES = 256
CLASSES = 10


def hidden_for(params: int) -> int:
    """Width h of the MLP ``IN -> h -> h -> CLASSES`` with about ``params`` parameters."""
    a, b, c = 1.0, IN_FEATURES + CLASSES + 2.0, CLASSES - float(params)
    return max(1, int(round((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a))))


def build_model(params: int) -> Any:
    from torch import nn

    h = hidden_for(params)
    return nn.Sequential(nn.Linear(IN_FEATURES, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                         nn.Linear(h, CLASSES))


# ------------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> int:
    """One system's run under mpirun: prints one JSON line on rank 0."""
    import torch
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    torch.manual_seed(comm.rank)
    model = build_model(args.params)
    nparams = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(100 + comm.rank)
    x = torch.randn(args.batch_size, IN_FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (args.batch_size,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    system = args.worker
    if system.startswith("hpc_dgrab"):
        import hpc_dgrab as hd

        hd.init()
        hd.broadcast_parameters(model.state_dict())
        compression = hd.RegTopK(density=args.density) if system.endswith("regtopk") else None
        backend = "gloo" if system.endswith("-gloo") else "mpi"
        opt = hd.DistributedOptimizer(opt, model.named_parameters(), compression=compression, backend=backend)
        net = model
    elif system == "horovod":
        hvd = import_horovod()
        hvd.init()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        net = model
    elif system == "ddp":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=comm.rank,
                                world_size=comm.size)
        net = torch.nn.parallel.DistributedDataParallel(model)
    else:
        raise UserError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
    loss_fn = torch.nn.functional.cross_entropy
    times = []
    for step in range(args.warmup + args.steps):
        comm.Barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    slowest = np.empty(len(times))
    comm.Allreduce(np.array(times), slowest, op=MPI.MAX)
    if system == "ddp":
        import torch.distributed as dist

        dist.destroy_process_group()
    if comm.rank == 0:
        print(json.dumps({"system": system, "params": nparams, "ranks": comm.size,
                          "step_s": float(np.median(slowest)), "steps": len(times)}), flush=True)
    if system == "ddp":
        # DDP's reducer still holds the gloo process group; its destructor, run at interpreter exit
        # with the GIL held, joins gloo's worker threads, and one of them may be waiting for the GIL
        # to free its last work item: a deadlock (2 runs in 30 here; torch's own tracking issue is
        # pytorch#56297). So this process ends without running destructors, once MPI is finalized.
        sys.stderr.flush()
        MPI.Finalize()
        os._exit(0)
    return 0


# ------------------------------------------------------------------------------------------ driver
def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m benchmarks {NAME}", description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help=f"directory for {NAME}.json and {NAME}.png")
    p.add_argument("--quick", action="store_true", help="smoke test: one tiny model, 2 ranks, 1 repeat")
    p.add_argument("--sizes", default="1e5,1e6,1e7", help="model sizes in parameters (default: %(default)s)")
    p.add_argument("--ranks", default="2,4", help="rank counts (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="rounds, systems rotated (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per run (default: by size)")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed steps (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per rank (default: %(default)s)")
    p.add_argument("--density", type=float, default=0.01, help="RegTop-k density (default: %(default)s)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="systems to run (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="debug logging")
    # internal: one system's processes
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--params", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _steps_for(params: int) -> int:
    return 30 if params <= 2e5 else (15 if params <= 2e6 else 6)


def run_system(args: argparse.Namespace, system: str, params: int, ranks: int) -> Dict[str, Any]:
    """Launch one system's run; the parsed JSON line, or ``{"error": ...}``."""
    steps = args.steps or (3 if args.quick else _steps_for(params))
    cmd = mpi_command(ranks) + [sys.executable, "-m", "benchmarks.peers", "--worker", system,
                                "--params", str(params), "--steps", str(steps), "--warmup", str(args.warmup),
                                "--batch-size", str(args.batch_size), "--density", str(args.density),
                                "--port", str(_free_port())]
    log.info("running %s", " ".join(cmd))
    try:
        env = child_env()
        if system in ("ddp", "hpc_dgrab-gloo"):
            env["GLOO_SOCKET_IFNAME"] = "lo"    # one host: gloo's pairs over loopback
        proc = procs.run(cmd, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def summarise(runs: List[Dict[str, Any]], systems: Sequence[str]) -> List[Dict[str, Any]]:
    """Per (ranks, size): each system's median step time over the repeats and our ratios to the best peer."""
    rows = []
    for key in sorted({(r["ranks"], r["size"]) for r in runs}):
        mine = [r for r in runs if (r["ranks"], r["size"]) == key]
        row: Dict[str, Any] = {"ranks": key[0], "size": key[1]}
        for s in systems:
            ok = [r["step_s"] for r in mine if r["system"] == s and "step_s" in r]
            row[s] = float(np.median(ok)) if ok else None
            if ok:
                row["params"] = next(r["params"] for r in mine if r["system"] == s and "params" in r)
        peers = [row[s] for s in PEERS if row.get(s) is not None]
        best = min(peers) if peers else None
        row["best_peer"] = None if best is None else min((s for s in PEERS if row.get(s) is not None),
                                                         key=lambda s: row[s])
        for s in ("hpc_dgrab", "hpc_dgrab+regtopk"):
            row[f"ratio_{s}"] = row[s] / best if best and row.get(s) is not None else None
        rows.append(row)
    return rows


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for ranks in sorted({r["ranks"] for r in rows}):
        sub = [r for r in rows if r["ranks"] == ranks]
        for s, style in (("hpc_dgrab", "-o"), ("hpc_dgrab+regtopk", "--s")):
            pts = [(r.get("params", r["size"]), r[f"ratio_{s}"]) for r in sub if r[f"ratio_{s}"] is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{s}, {ranks} ranks")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(0.95, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("model parameters")
    ax.set_ylabel("step time / best of Horovod, DDP (median)")
    ax.set_title("synchronous SGD step time relative to the best peer (lower is better)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fileio.save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    setup_logging(args.debug)
    if not args.out:
        raise UserError("--out DIR is required")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise UserError(f"unknown system {bad[0]!r}; choose from {', '.join(SYSTEMS)}")
    try:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
        rank_counts = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        raise UserError("--sizes and --ranks take comma-separated numbers") from None
    if args.quick:
        sizes, rank_counts, args.repeats = [20_000], [2], 1
    missing = []
    if "horovod" in systems and not horovod_available():
        missing.append("horovod")
        systems.remove("horovod")
        log.warning("horovod does not import: recorded as missing")
    runs: List[Dict[str, Any]] = []
    for ranks in rank_counts:
        for size in sizes:
            for rep in range(args.repeats):
                order = systems[rep % len(systems):] + systems[:rep % len(systems)]
                for system in order:
                    res = run_system(args, system, size, ranks)
                    res.update({"system": system, "size": size, "ranks": ranks, "repeat": rep})
                    runs.append(res)
                    log.info("%s", res)
    rows = summarise(runs, systems)
    result = {"benchmark": NAME, "batch_size": args.batch_size, "density": args.density,
              "repeats": args.repeats,
              "warmup": args.warmup, "cores": os.cpu_count(), "torch_threads_per_rank": 1, "missing": missing,
              "note": "median step time (slowest rank) per run, median over the rotated repeats; "
                      "ratio = ours / "
                      "the best of Horovod and DDP in the same invocation, on a possibly shared machine",
              "summary": rows, "runs": runs}
    os.makedirs(args.out, exist_ok=True)
    fileio.write_json(os.path.join(args.out, f"{NAME}.json"), result)
    plot(rows, os.path.join(args.out, f"{NAME}.png"))
    cols = ["hpc_dgrab", "hpc_dgrab+regtopk", "hpc_dgrab-gloo", "horovod", "ddp"]
    print(f"{'ranks':>5} {'params':>9} " + " ".join(f"{c:>18}" for c in cols)
          + f" {'ratio':>7} {'ratio_rtk':>9}")
    for r in rows:
        cells = " ".join(f"{(r.get(c) or float('nan')) * 1e3:>16.2f}ms" for c in cols)
        rat = r["ratio_hpc_dgrab"]
        rtk = r["ratio_hpc_dgrab+regtopk"]
        print(f"{r['ranks']:>5} {r.get('params', r['size']):>9} {cells} "
              f"{float('nan') if rat is None else rat:>7.3f} "
              f"{float('nan') if rtk is None else rtk:>9.3f}")
    for m in missing:
        print(f"{m}: missing (does not import)")
    errors = [r for r in runs if "error" in r]
    for e in errors:
        print(f"failed: {e['system']} at {e['size']} on {e['ranks']} ranks: {e['error']}")
    return 0


if __name__ == "__main__":
    run_main(main)
