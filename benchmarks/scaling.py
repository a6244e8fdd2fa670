"""Step time versus ranks and model size for every exchange mode, unshaped and over emulated links.

``python -m benchmarks scaling --out DIR [--quick]`` (as root for the emulated links) writes
``DIR/scaling.json`` and ``DIR/scaling.png`` and prints a table.

Grid: ranks 2, 4, 8 x model size 1e5, 1e6, 1e7 parameters x network (``local``: one host, shared
memory, no shaping; ``10gbit`` and ``1gbit``: one rank per emulated host of ``launch/netem``, every
byte between ranks through a tbf-shaped veth link) x mode:

* ``allreduce`` — a user's loop over ``hd.DistributedOptimizer`` (bucketed MPI all-reduce);
* ``horovod`` — the same with ``backend="horovod"`` (where ``horovod.torch`` imports);
* ``topk-1%``, ``topk-0.1%``, ``regtopk-1%``, ``regtopk-0.1%`` — the same with
  ``compression=hd.TopK(...)`` / ``hd.RegTopK(...)`` (sparse all-gather with error feedback);
* ``dgrab`` — the same with ``hd.OrderedSampler(order="dgrab")`` (parallel mode, balancing units in
  pairs of 2-example micro-batches): its order payload (d+1 numbers) rides on the gradient message;
* ``gossip-ring``, ``gossip-one-peer-exponential`` — a user's loop over ``hd.GossipOptimizer``
  (DASGD: one push-sum share to the graph's neighbours and a merge of what arrived per step;
  out-degree 2 and 1: constant in the rank count; non-blocking, at most 2 messages in flight per
  peer: a slower link means dropped, replaced messages, not waiting).

The model is an MLP 784 -> h -> 10 with h chosen for the size; batch 16 per rank of random data.
Per step, each rank measures ``step_s`` (the whole step) and ``exchange_s`` (the time of the
gradient exchange not hidden behind backward: ``synchronize()``, with compression, message packing
and the wire; for gossip ``step()``: the local update, push and merge);
``compute_s = step_s - exchange_s`` (forward, backward, per-example gradients for D-GraB, the
optimizer). A cell reports the median over steps of the slowest rank. Bytes: ``bytes_sent`` = what
this rank handed to the network per step (the library's counters: the all-reduce buffer, the sparse
message, the gossip messages); ``wire_tx_bytes`` = bytes the rank's host interface really sent per
step (``/proc/net/dev`` of its network namespace over the whole cell, warm-up step and barriers
included, divided by the steps; TCP/IP headers included; emulated hosts only).

Each (network, ranks) cell of the grid is one MPI job; Horovod runs last in each job (its
background thread would disturb the others). Ranks outnumber this machine's cores at 4 and 8: the
numbers then include time-slicing, and per-rank compute grows with the rank count — read the
scaling of the exchange against ``compute_s`` of the same cell. --quick: ranks 2, 4, sizes 1e5, 1e6,
networks local and 1gbit, 3 measured steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from benchmarks.checkout import child_env, horovod_available, import_horovod, launcher
from hpc_dgrab import fileio
from hpc_dgrab.cli import ArgumentParser, UserError, positive_int, run_main, setup_logging

log = logging.getLogger(__name__)

NAME = "scaling"
RANKS = [2, 4, 8]
SIZES = [100_000, 1_000_000, 10_000_000]
NETWORKS = ["local", "10gbit", "1gbit"]
MODES = ["allreduce", "horovod", "topk-1%", "topk-0.1%", "regtopk-1%", "regtopk-0.1%", "dgrab",
         "gossip-ring", "gossip-one-peer-exponential"]
BATCH = 16


def mlp(numel: int, seed: int = 0) -> nn.Module:
    """784 -> h -> 10 with about ``numel`` parameters."""
    hidden = max(1, round((numel - 10) / 795))
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


# ------------------------------------------------------------------------------------------------
# worker (one MPI job: every mode and size on this rank count and network)


def wire_tx(iface: Optional[str]) -> int:
    """Bytes sent so far by ``iface`` of this process's network namespace (0 without an iface)."""
    if not iface:
        return 0
    with open("/proc/self/net/dev") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name.strip() == iface:
                return int(rest.split()[8])
    return 0


def _compression(mode: str) -> Any:
    """The compressor object of a ``topk-P%`` / ``regtopk-P%`` mode (None: dense)."""
    import hpc_dgrab as hd

    if not mode.startswith(("topk-", "regtopk-")):
        return None
    method, pct = mode.split("-")
    density = float(pct.rstrip("%")) / 100
    return hd.TopK(density=density) if method == "topk" else hd.RegTopK(density=density, mu=4.0)


def _sync_cell(mode: str, numel: int, steps: int, comm: Any, iface: Optional[str]) -> Dict:
    """``steps`` steps of a user's loop over ``hd.DistributedOptimizer`` (and ``hd.OrderedSampler``
    for ``dgrab``); ``exchange_s`` is ``synchronize()``, what backward did not hide of the exchange."""
    import hpc_dgrab as hd

    model = mlp(numel)
    sampler = None
    if mode == "dgrab":
        sampler = hd.OrderedSampler(steps * BATCH, order="dgrab", seed=0, mode="parallel",
                                    units="microbatch:2")
        order = sampler.order()
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model.named_parameters(),
                                  compression=_compression(mode),
                                  backend="horovod" if mode == "horovod" else "mpi", sampler=sampler)
    loss_fn = nn.functional.cross_entropy
    gen = torch.Generator().manual_seed(comm.rank)
    x_all = torch.randn(steps * BATCH, 784, generator=gen)
    y_all = torch.randint(0, 10, (steps * BATCH,), generator=gen)
    rows = []
    wire0 = wire_tx(iface)
    for step in range(steps):
        idx = order[step * BATCH:(step + 1) * BATCH] if sampler is not None \
            else np.arange(step * BATCH, (step + 1) * BATCH)
        x, y = x_all[idx], y_all[idx]
        comm.Barrier()
        b0 = opt.bytes_sent
        t0 = time.perf_counter()
        opt.zero_grad()
        if sampler is not None:
            sampler.backward(model, loss_fn, x, y, indices=idx)
        else:
            loss_fn(model(x), y).backward()
        t1 = time.perf_counter()
        opt.synchronize()
        t2 = time.perf_counter()
        with opt.skip_synchronize():
            opt.step()
        rows.append((time.perf_counter() - t0, t2 - t1, opt.bytes_sent - b0))
    comm.Barrier()
    if sampler is not None:
        sampler.set_epoch(1)
    opt.remove_hooks()
    return {"numel": sum(p.numel() for p in model.parameters()), "per_step": rows,
            "wire_tx_total": wire_tx(iface) - wire0}


def _gossip_cell(mode: str, numel: int, steps: int, comm: Any, iface: Optional[str]) -> Dict:
    """``steps`` steps of a user's loop over ``hd.GossipOptimizer`` on the mode's graph;
    ``exchange_s`` is ``step()`` (the local update, push and merge), ``drain_s`` is ``finish()``."""
    import hpc_dgrab as hd
    from hpc_dgrab.comm.topology import Topology

    name = mode[len("gossip-"):]
    model = mlp(numel)
    opt = hd.GossipOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model, topology=name,
                             max_in_flight=2)
    gen = torch.Generator().manual_seed(comm.rank)
    rows = []
    wire0 = wire_tx(iface)
    for _ in range(steps):
        x = torch.randn(BATCH, 784, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        comm.Barrier()
        s0 = opt.bytes_sent
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        rows.append((t2 - t0, t2 - t1, opt.bytes_sent - s0))
    t3 = time.perf_counter()
    stats = opt.finish(timeout=120.0)     # serve until every rank is done, then every message delivered
    drain_s = time.perf_counter() - t3
    return {"numel": sum(p.numel() for p in model.parameters()), "per_step": rows, "drain_s": drain_s,
            "wire_tx_total": wire_tx(iface) - wire0,
            "messages_sent": stats["messages_sent"], "replacements": stats["replacements"],
            "staleness_avg": stats["staleness_avg"],
            "out_degree": Topology.from_name(name, comm.size).out_degree(comm.rank)}


def _summarise(comm: Any, mode: str, cell: Dict) -> Dict:
    from mpi4py import MPI

    steps = len(cell["per_step"])
    per = np.array(cell.pop("per_step"), dtype=float)[1:]          # the first step is warm-up
    wire = comm.allreduce(float(cell.pop("wire_tx_total"))) / comm.size / steps
    worst = np.empty_like(per)
    comm.Allreduce(per, worst, op=MPI.MAX)                          # slowest rank of each step
    mean = np.empty_like(per)
    comm.Allreduce(per, mean, op=MPI.SUM)
    mean /= comm.size
    med = np.median(worst, axis=0)
    return {"mode": mode, **cell, "step_s": float(med[0]), "exchange_s": float(med[1]),
            "compute_s": float(np.median(worst[:, 0] - worst[:, 1])),
            "bytes_sent": float(np.median(mean[:, 2])), "wire_tx_bytes": wire,
            "steps_measured": int(len(per))}


def worker(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    import hpc_dgrab as hd

    hd.init()
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    modes = [m for m in args.modes.split(",") if m]
    rows: List[Dict] = []
    steps = args.steps + 1
    ran_horovod = False
    for mode in [m for m in modes if m != "horovod"] + (["horovod"] if "horovod" in modes else []):
        if mode == "horovod" and not horovod_available():
            rows.append({"mode": mode, "skipped": "horovod.torch does not import"})
            continue
        ran_horovod = ran_horovod or mode == "horovod"
        for numel in args.sizes:
            t0 = time.perf_counter()
            if mode.startswith("gossip-"):
                cell = _gossip_cell(mode, numel, steps, comm, args.iface)
            else:
                cell = _sync_cell(mode, numel, steps, comm, args.iface)
            row = _summarise(comm, mode, cell)
            row["size"] = numel
            rows.append(row)
            if comm.rank == 0:
                log.info("%d ranks %-28s %.0e: step %.4f s exchange %.4f s (%.1f s)", comm.size, mode, numel,
                         row["step_s"], row["exchange_s"], time.perf_counter() - t0)
    if ran_horovod:
        import_horovod().shutdown()
    if comm.rank == 0:
        fileio.write_json(args.worker_out, {"ranks": comm.size, "rows": rows})
    return 0


# ------------------------------------------------------------------------------------------------
# driver


def netem_unavailable() -> Optional[str]:
    """Why the emulated networks cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "not root (launch/netem needs network namespaces)"
    probe = subprocess.run([sys.executable, launcher("netem"), "status", "--json"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return f"launch/netem status failed: {probe.stderr.strip()}"
    if json.loads(probe.stdout)["namespaces"]:
        return "an emulation is already up (launch/netem status); not touching it"
    return None


def run_cell(network: str, ranks: int, args: argparse.Namespace, tmp: str) -> Dict:
    out = os.path.join(tmp, f"{network}-{ranks}.json")
    worker_argv = [sys.executable, "-m", "benchmarks", NAME, "--worker", "--worker-out", out,
                   "--sizes", ",".join(str(s) for s in args.sizes), "--modes", ",".join(args.modes),
                   "--steps", str(args.steps), "--out", tmp] + (["--debug"] if args.debug else [])
    env = child_env()
    netem = launcher("netem")
    if network == "local":
        cmd = [launcher("local"), "-n", str(ranks), "--"] + worker_argv
    else:
        up = subprocess.run([sys.executable, netem, "up", str(ranks), "--rate", network], capture_output=True,
                            text=True, env=env, timeout=120)
        if up.returncode != 0:
            raise UserError(f"bench {NAME}: launch/netem up failed: {up.stderr.strip().splitlines()[-1]}")
        cmd = [sys.executable, netem, "run", "-n", str(ranks), "--"] + worker_argv + ["--iface", "eth0"]
    log.info("%s, %d ranks: %s", network, ranks, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"bench {NAME}: {network} {ranks}-rank job timed out after {args.timeout:.0f} s"
                        ) from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if "setpgid" not in ln]
        tail = " | ".join([ln for ln in lines if ln.startswith("error:")][:1] or lines[-3:])
        raise UserError(f"bench {NAME}: {network} {ranks}-rank job failed (exit {proc.returncode}): {tail}")
    with open(out) as fh:
        result = json.load(fh)
    if network != "local":
        st = json.loads(subprocess.run([sys.executable, netem, "status", "--json"], capture_output=True,
                                       text=True).stdout)
        result["link_check"] = (st.get("state") or {}).get("check")
    return result


def plot(result: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = result["networks"]
    sizes = result["sizes"]
    fig, axes = plt.subplots(len(nets), len(sizes), figsize=(4.6 * len(sizes), 3.6 * len(nets)),
                             squeeze=False)
    for i, net in enumerate(nets):
        for j, size in enumerate(sizes):
            ax = axes[i][j]
            for k, mode in enumerate(result["modes"]):
                pts = sorted((r["ranks"], r["step_s"], r["compute_s"]) for r in result["rows"]
                             if r.get("network") == net and r.get("size") == size and r["mode"] == mode
                             and "step_s" in r)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{k % 10}",
                            label=mode)
            comp = sorted((r["ranks"], r["compute_s"]) for r in result["rows"] if r.get("network") == net
                          and r.get("size") == size and r["mode"] == "allreduce" and "step_s" in r)
            if comp:
                ax.plot([p[0] for p in comp], [p[1] for p in comp], "k--", lw=1,
                        label="compute (all-reduce run)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{net}, {size:.0e} params", fontsize=9)
            ax.set_xlabel("ranks")
            ax.set_ylabel("step time (s)")
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    fig.suptitle("step time vs ranks (median step, slowest rank); 2-core machine, ranks time-slice",
                 fontsize=10)
    fig.tight_layout()
    fileio.save_figure(fig, path, dpi=100)
    plt.close(fig)


def gossip_flatness(rows: List[Dict]) -> List[Dict]:
    """Per network/size/topology: gossip exchange time at the largest vs the smallest rank count."""
    out = []
    keys = {(r["network"], r["size"], r["mode"]) for r in rows
            if r["mode"].startswith("gossip-") and "step_s" in r}
    for net, size, mode in sorted(keys):
        pts = sorted((r["ranks"], r["exchange_s"], r["compute_s"]) for r in rows
                     if (r.get("network"), r.get("size"), r["mode"]) == (net, size, mode) and "step_s" in r)
        if len(pts) > 1:
            out.append({"network": net, "size": size, "mode": mode, "ranks": [p[0] for p in pts],
                        "exchange_s": [p[1] for p in pts], "compute_s": [p[2] for p in pts],
                        "exchange_growth": pts[-1][1] / pts[0][1] if pts[0][1] > 0 else None,
                        "compute_growth": pts[-1][2] / pts[0][2] if pts[0][2] > 0 else None})
    return out


def _exit_on_term(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _ints(text: str) -> List[int]:
    try:
        vals = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m benchmarks {NAME}", description=__doc__.splitlines()[0],
                       epilog="\n".join(__doc__.splitlines()[2:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help=f"directory for {NAME}.json and {NAME}.png")
    p.add_argument("--quick", action="store_true", help="ranks 2,4; sizes 1e5,1e6; local and 1gbit; 3 steps")
    p.add_argument("--ranks", type=_ints, default=None, help="rank counts (default 2,4,8)")
    p.add_argument("--sizes", type=_ints, default=None,
                   help="model sizes in parameters (default 1e5,1e6,1e7)")
    p.add_argument("--networks", default=None, help="comma-separated: local, and link rates for launch/netem "
                                                     "(default local,10gbit,1gbit)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes (default: all)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="measured steps per cell (default 6; 3 quick)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per MPI job (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="debug logging")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--iface", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    if args.worker:
        args.steps = args.steps or 6
        return worker(args)
    args.ranks = args.ranks or ([2, 4] if args.quick else RANKS)
    args.sizes = args.sizes or ([100_000, 1_000_000] if args.quick else SIZES)
    args.steps = args.steps or (3 if args.quick else 6)
    networks = (args.networks.split(",") if args.networks
                else (["local", "1gbit"] if args.quick else NETWORKS))
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise UserError(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if min(args.ranks) < 2:
        raise UserError("--ranks must be >= 2")
    os.makedirs(args.out, exist_ok=True)
    skipped: Dict[str, str] = {}
    why = netem_unavailable() if any(n != "local" for n in networks) else None
    if why:
        skipped.update({n: why for n in networks if n != "local"})
        networks = [n for n in networks if n == "local"]
    rows: List[Dict] = []
    checks: Dict[str, Any] = {}
    start = time.perf_counter()
    old_term = signal.signal(signal.SIGTERM, _exit_on_term)       # so that `finally` tears down
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        try:
            for net in networks:
                for ranks in args.ranks:
                    cell = run_cell(net, ranks, args, tmp)
                    if cell.get("link_check"):
                        checks[f"{net}-{ranks}"] = cell["link_check"]
                    for r in cell["rows"]:
                        rows.append({"network": net, "ranks": ranks, **r})
        finally:
            if any(n != "local" for n in networks):
                subprocess.run([sys.executable, launcher("netem"), "down"], capture_output=True)
            signal.signal(signal.SIGTERM, old_term)
    result = {"benchmark": NAME, "networks": networks, "ranks": args.ranks, "sizes": args.sizes,
              "modes": args.modes, "batch_per_rank": BATCH, "steps_measured": args.steps,
              "cores": os.cpu_count(), "quick": args.quick,
              "skipped_networks": skipped, "link_checks": checks, "rows": rows,
              "gossip_flatness": gossip_flatness(rows), "elapsed_s": round(time.perf_counter() - start, 1),
              "note": "median step of the slowest rank; ranks > cores time-slice, "
                      "so compute_s grows with ranks"}
    fileio.write_json(os.path.join(args.out, f"{NAME}.json"), result)
    plot(result, os.path.join(args.out, f"{NAME}.png"))
    print(f"{'network':>8} {'ranks':>5} {'size':>6} {'mode':<28} {'step s':>8} {'exch s':>8} {'comp s':>8} "
          f"{'sent MB':>8} {'wire MB':>8}")
    for r in rows:
        if "step_s" not in r:
            print(f"{r['network']:>8} {r['ranks']:>5} {'':>6} {r['mode']:<28} skipped: {r.get('skipped')}")
            continue
        print(f"{r['network']:>8} {r['ranks']:>5} {r['size']:>6.0e} {r['mode']:<28} {r['step_s']:8.4f} "
              f"{r['exchange_s']:8.4f} {r['compute_s']:8.4f} {r['bytes_sent'] / 1e6:8.3f} "
              f"{r['wire_tx_bytes'] / 1e6:8.3f}")
    for net, why in skipped.items():
        print(f"{net}: skipped ({why})")
    print(f"wrote {os.path.join(args.out, NAME + '.json')} and {NAME}.png ({result['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    run_main(main)
