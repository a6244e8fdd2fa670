"""D-GraB's order data in a DDP step: its own all-reduce (ddp_order's) vs riding in the last bucket.

``python -m benchmarks ddp-order --out DIR [--params 1e6] [--ranks 2] [--repeats 5]`` launches one
job (``launch/local -n RANKS``, gloo on this host, ``hd.init(backend="gloo")``) that times three
variants of a DDP step of an MLP with about ``--params`` parameters, round by round with the order
of the variants rotated, and writes ``DIR/ddp-order.json``:

* ``none``: DDP with torch's all-reduce hook, no order data (the floor);
* ``own``: the same, then the order data (one float vector of the model's size, as D-GraB's signed
  pair differences) summed by ``ddp_order.OrderChannel.add_payload``, one blocking all-reduce;
* ``bucket``: a hook that all-reduces DDP's last bucket with the order data appended (one
  all-reduce of bucket + payload) and splits the result, the alternative the library did not take.

A step's time is the slowest rank's; a variant's number is the median over its steps of all
rounds. ``own_over_bucket`` = own / bucket (above 1: the own all-reduce costs more); ``extra_*`` is
each variant's time minus ``none``'s.
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

from benchmarks.checkout import child_env, mpi_command
from hpc_dgrab import fileio
from hpc_dgrab.cli import ArgumentParser, UserError, positive_int, run_main, setup_logging

log = logging.getLogger(__name__)

NAME = "ddp-order"
VARIANTS = ("none", "own", "bucket")


def _bucket_hook(payload: Any) -> Any:
    """A DDP hook summing the last bucket together with ``payload`` (one all-reduce)."""
    import torch
    import torch.distributed as dist

    def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations
        buf = bucket.buffer()
        world = dist.get_world_size()
        if not bucket.is_last():
            fut = dist.all_reduce(buf.div_(world), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])
        both = torch.cat([buf, payload]).div_(world)
        fut = dist.all_reduce(both, async_op=True).get_future()

        def split(f: Any) -> Any:
            total = f.value()[0]
            payload.copy_(total[buf.numel():])
            return total[:buf.numel()]
        return fut.then(split)
    return hook


def worker(args: argparse.Namespace) -> int:
    """Under mpirun: times the variants; rank 0 prints one JSON line."""
    import torch
    from mpi4py import MPI
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import hpc_dgrab as hd
    from benchmarks.peers import CLASSES, IN_FEATURES, build_model
    from hpc_dgrab.ddp_order import OrderChannel

    hd.init(backend="gloo")
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(100 + comm.rank)
    x = torch.randn(args.batch_size, IN_FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (args.batch_size,), generator=g)
    nets: Dict[str, Any] = {}
    payloads: Dict[str, Any] = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        model = build_model(args.params)
        payloads[name] = torch.randn(sum(p.numel() for p in model.parameters()), generator=g)
        net = torch.nn.parallel.DistributedDataParallel(model)
        if name == "bucket":
            net.register_comm_hook(None, _bucket_hook(payloads[name]))
        else:
            net.register_comm_hook(None, default_hooks.allreduce_hook)
        nets[name] = (net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
    channel = OrderChannel()
    times: Dict[str, List[float]] = {name: [] for name in VARIANTS}
    for rnd in range(args.repeats):
        order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[:rnd % len(VARIANTS)]
        for name in order:
            net, opt = nets[name]
            for step in range(args.warmup + args.steps):
                comm.Barrier()
                t0 = time.perf_counter()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x), y).backward()
                if name == "own":
                    channel.add_payload(payloads[name])
                opt.step()
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
    out: Dict[str, Any] = {"params": int(payloads["none"].numel()), "ranks": comm.size}
    for name in VARIANTS:
        slowest = np.empty(len(times[name]))
        comm.Allreduce(np.array(times[name]), slowest, op=MPI.MAX)
        out[f"{name}_step_s"] = float(np.median(slowest))
    if comm.rank == 0:
        print(json.dumps(out), flush=True)
    hd.shutdown()
    sys.stdout.flush()      # DDP's reducers still hold the gloo group: no destructors (see peers.py)
    if not MPI.Is_finalized():
        MPI.Finalize()
    os._exit(0)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m benchmarks {NAME}", description=__doc__.splitlines()[0],
                       epilog="\n".join(__doc__.splitlines()[2:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help=f"directory for {NAME}.json")
    p.add_argument("--params", type=float, default=1e6, help="model size (default: %(default)g)")
    p.add_argument("--ranks", type=positive_int, default=2, help="ranks (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=5, help="rounds (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per variant and round")
    p.add_argument("--warmup", type=positive_int, default=2, help="untimed steps per variant and round")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per rank (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600, help="seconds (default: %(default)s)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="debug logging")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.params = int(args.params)
    if args.worker:
        return worker(args)
    setup_logging(args.debug)
    cmd = mpi_command(args.ranks) + [sys.executable, "-m", "benchmarks.ddp_order", "--worker", "--out",
                                     args.out, "--params", str(args.params), "--repeats", str(args.repeats),
                                     "--steps", str(args.steps), "--warmup", str(args.warmup),
                                     "--batch-size", str(args.batch_size)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=child_env())
    except subprocess.TimeoutExpired:
        raise UserError(f"bench {NAME}: the job timed out after {args.timeout:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise UserError(f"bench {NAME}: the job failed (exit {proc.returncode}): {tail}")
    result: Dict[str, Any] = {"benchmark": NAME, **json.loads(lines[-1]), "repeats": args.repeats,
                              "steps": args.steps, "batch_size": args.batch_size, "cores": os.cpu_count()}
    for name in ("own", "bucket"):
        result[f"extra_{name}_s"] = result[f"{name}_step_s"] - result["none_step_s"]
    result["own_over_bucket"] = result["own_step_s"] / result["bucket_step_s"]
    os.makedirs(args.out, exist_ok=True)
    fileio.write_json(os.path.join(args.out, f"{NAME}.json"), result)
    print(f"{result['ranks']} ranks, {result['params']} parameters: step none "
          f"{result['none_step_s'] * 1e3:.2f} ms, "
          f"own {result['own_step_s'] * 1e3:.2f} ms, bucket {result['bucket_step_s'] * 1e3:.2f} ms; "
          f"own/bucket {result['own_over_bucket']:.3f}")
    return 0


if __name__ == "__main__":
    run_main(main)
