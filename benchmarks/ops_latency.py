"""Cost per operation of hd.allreduce: raw MPI vs hpc_dgrab (name-matching engine) vs Horovod.

``python -m benchmarks ops-latency [--ranks 2] [--repeats 3] [--iters 300] [--out DIR]`` launches
each system in its own processes (``launch/local -n RANKS``), rotating their order each repeat so
machine noise hits all alike, and prints one JSON object (also ``DIR/ops-latency.json``):

* ``mpi``: ``comm.Allreduce`` of 4 float32 (mpi4py, no engine): the transport's own latency;
* ``hpc_dgrab``: ``hd.allreduce(torch.ones(4), op=hd.Sum)`` (negotiation by name on the engine thread);
* ``horovod``: ``hvd.allreduce`` of the same tensor (recorded as missing when Horovod does not import).

Each run times ``--iters`` blocking operations after ``--warmup`` and reports microseconds per
operation (the slowest rank's); a system's number is the median over repeats. ``ratio_vs_mpi`` and
``ratio_vs_horovod`` are hpc_dgrab's median over theirs (< 1: faster). On a shared machine compare
ratios, and record the load average (``uptime``) beside them.
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

from benchmarks.checkout import child_env, horovod_available, mpi_command
from hpc_dgrab import fileio, procs
from hpc_dgrab.cli import ArgumentParser, UserError, positive_int, run_main, setup_logging

log = logging.getLogger(__name__)

NAME = "ops-latency"
SYSTEMS = ("mpi", "hpc_dgrab", "horovod")


def worker(system: str, iters: int, warmup: int) -> int:
    import torch
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    x = torch.ones(4)
    if system == "mpi":
        buf = x.numpy()

        def op() -> None:
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    elif system == "hpc_dgrab":
        import hpc_dgrab as hd

        hd.init()

        def op() -> None:
            hd.allreduce(x, op=hd.Sum)
    else:
        import horovod.torch as hvd

        hvd.init()

        def op() -> None:
            hvd.allreduce(x, op=hvd.Sum)
    for _ in range(warmup):
        op()
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        op()
    per_op = comm.allreduce((time.perf_counter() - t0) / iters, op=MPI.MAX)
    if comm.rank == 0:
        sys.stdout.write(json.dumps({"us_per_op": per_op * 1e6}) + "\n")
    return 0


def run_system(system: str, ranks: int, iters: int, warmup: int, timeout: float) -> Dict[str, Any]:
    cmd = mpi_command(ranks) + [sys.executable, "-m", "benchmarks.ops_latency", "--worker", system,
                                "--iters", str(iters), "--warmup", str(warmup)]
    try:
        proc = procs.run(cmd, env=child_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {' | '.join(proc.stderr.strip().splitlines()[-2:])}"}
    return dict(json.loads(lines[-1]))


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m benchmarks {NAME}", description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=positive_int, default=2, help="ranks (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="rounds, systems rotated (default: %(default)s)")
    p.add_argument("--iters", type=positive_int, default=300, help="timed operations (default: %(default)s)")
    p.add_argument("--warmup", type=positive_int, default=20,
                   help="untimed operations (default: %(default)s)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="systems (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run (default: %(default)s)")
    p.add_argument("--out", help=f"directory for {NAME}.json")
    p.add_argument("--debug", action="store_true", help="debug logging")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args.worker, args.iters, args.warmup)
    setup_logging(args.debug)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise UserError(f"unknown system {bad[0]!r}; choose from {', '.join(SYSTEMS)}")
    missing = []
    if "horovod" in systems and not horovod_available():
        systems.remove("horovod")
        missing.append("horovod")
    runs: List[Dict[str, Any]] = []
    for rep in range(args.repeats):
        for system in systems[rep % len(systems):] + systems[:rep % len(systems)]:
            res = run_system(system, args.ranks, args.iters, args.warmup, args.timeout)
            res.update(system=system, repeat=rep)
            runs.append(res)
            log.info("%s", res)
    med = {s: float(np.median([r["us_per_op"] for r in runs if r["system"] == s and "us_per_op" in r]))
           for s in systems if any(r["system"] == s and "us_per_op" in r for r in runs)}
    out: Dict[str, Any] = {"ranks": args.ranks, "iters": args.iters, "us_per_op_median": med,
                           "load_average": list(os.getloadavg()), "missing": missing, "runs": runs}
    if "hpc_dgrab" in med:
        for peer in ("mpi", "horovod"):
            if peer in med:
                out[f"ratio_vs_{peer}"] = med["hpc_dgrab"] / med[peer]
    text = json.dumps(out, indent=1)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        fileio.write_text(os.path.join(args.out, f"{NAME}.json"), text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
