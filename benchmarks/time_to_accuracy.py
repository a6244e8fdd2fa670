"""Wall time to a target validation accuracy on emulated hosts: Horovod baseline vs the methods.

``python -m benchmarks time-to-accuracy --hosts 8 --rate 1gbit --out DIR [--quick]`` (as root)
brings up ``--hosts`` emulated hosts with ``launch/netem`` (one rank per host, every byte between
ranks through a ``--rate`` link), trains the CNN on a seeded Fashion-MNIST subsample (iid shards)
with ``python -m hpc_dgrab.train`` over ``launch/netem run`` once per configuration and seed, and
writes ``DIR/time-to-accuracy.json`` and ``DIR/time-to-accuracy.png`` (validation accuracy against
training wall time). Configurations (trainer flags):

* ``horovod`` (the baseline): ``--sync horovod --order rr`` — Horovod all-reduce, random reshuffling;
  where Horovod does not import, ``allreduce`` is the baseline (said in the JSON);
* ``allreduce``: plain MPI all-reduce;
* ``topk-1%``, ``topk-0.1%``, ``regtopk-1%``, ``regtopk-0.1%``: ``--compress ... --density ...``;
* ``dgrab``: ``--order dgrab``;
* ``gossip``: ``--sync gossip --topology one-peer-exponential`` (DASGD);
* ``choco-topk-1%`` (compressed gossip, CHOCO): ``--sync gossip --topology exponential --compress
  topk --density 0.01``;
* ``regtopk-1%+dgrab`` (the composition): RegTop-k 1 % with D-GraB's order riding on it;
* ``ddp``, ``ddp-fp16``, ``ddp-powersgd``, ``ddp-topk-1%``, ``ddp-regtopk-1%``: the same problem
  in torch DDP over gloo with torch's all-reduce, fp16 and PowerSGD (rank 2) hooks and our Top-k and
  RegTop-k hooks (``benchmarks/_ddp_train.py``; ``MASTER_ADDR`` is host 0, ``GLOO_SOCKET_IFNAME``
  its shaped interface).

``--straggler RANK:FACTOR`` adds the trainer's ``--straggler`` to every configuration (a slow host:
that rank idles FACTOR-1 times its own compute every step); the DDP runner has no straggler, so the
``ddp*`` configurations are refused with it. ``--baseline`` names the reference configuration
(default ``horovod``; ``allreduce`` where Horovod does not import).

Target: ``--target`` or, by default, 0.97 x the baseline's best validation accuracy (median over
seeds), measured first. Time to target = the training-loop seconds (sum of the metrics'
``epoch_time_s``; evaluation and start-up excluded) up to the first epoch whose ``val_acc`` reaches
it; epochs to target and bytes sent up to then (``comm_bytes``, which includes D-GraB's payload
riding on the gradient message) come from the same records. A configuration's value is the median
over the seeds that reached the target (``reached`` says how many did). ``best_over_baseline`` =
the fastest configuration's time / ``baseline_s``. --quick: 4 hosts, 2 seeds, the configurations
without 0.1 % densities and DDP, 3200 training images, 5 epochs.

What limits the ratio on this machine: the emulated hosts share 2 CPU cores, so each rank computes
at 2/hosts of a core and a CNN step's compute is far larger than its 1 Gbit/s communication; the
methods that save bytes have little to save. See docs/benchmarks.md for the numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from benchmarks.checkout import child_env, horovod_available, launcher
from benchmarks.straggler import make_data
from hpc_dgrab import fileio
from hpc_dgrab.cli import ArgumentParser, UserError, positive_float, positive_int, run_main, setup_logging
from hpc_dgrab.metrics import read_jsonl
from hpc_dgrab.optim.straggler import parse_straggler

log = logging.getLogger(__name__)

NAME = "time-to-accuracy"


DDP = "ddp"
SUBNET = "10.231.0"     # launch/netem's hosts: SUBNET.1 .. SUBNET.N


def configs(quick: bool) -> Dict[str, List[str]]:
    """Configuration name -> flags (the trainer's; the DDP runner's for names starting ``ddp``)."""
    full = {
        "horovod": ["--sync", "horovod", "--order", "rr"],
        "allreduce": ["--sync", "allreduce"],
        "topk-1%": ["--compress", "topk", "--density", "0.01"],
        "topk-0.1%": ["--compress", "topk", "--density", "0.001"],
        "regtopk-1%": ["--compress", "regtopk", "--density", "0.01"],
        "regtopk-0.1%": ["--compress", "regtopk", "--density", "0.001"],
        "dgrab": ["--order", "dgrab"],
        "gossip": ["--sync", "gossip", "--topology", "one-peer-exponential"],
        "choco-topk-1%": ["--sync", "gossip", "--topology", "exponential", "--compress", "topk",
                          "--density", "0.01"],
        "regtopk-1%+dgrab": ["--compress", "regtopk", "--density", "0.01", "--order", "dgrab"],
        "ddp": ["--hook", "none"],
        "ddp-fp16": ["--hook", "fp16"],
        "ddp-powersgd": ["--hook", "powersgd", "--powersgd-rank", "2"],
        "ddp-topk-1%": ["--hook", "topk", "--density", "0.01"],
        "ddp-regtopk-1%": ["--hook", "regtopk", "--density", "0.01"],
    }
    if quick:
        for name in [n for n in full if "0.1%" in n or n.startswith(DDP)]:
            del full[name]
    return full


def netem(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, launcher("netem"), *args],
                          capture_output=True, text=True, timeout=timeout, env=child_env())


def train_once(args: argparse.Namespace, data: str, flags: List[str], seed: int,
               metrics: str) -> Dict[str, Any]:
    ddp = flags[0] == "--hook"
    program = ["-m", "benchmarks._ddp_train"] if ddp else ["-m", "hpc_dgrab.train", "--progress", "off"]
    if args.straggler and not ddp:
        flags = flags + ["--straggler", args.straggler]
    cmd = [sys.executable, launcher("netem"), "run", "-n", str(args.hosts), "--",
           sys.executable, *program, "--data", data, "--model", args.model,
           "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
           "--seed", str(seed), "--metrics", metrics] + flags
    env = child_env()
    if ddp:     # gloo's rendezvous and sockets on host 0's shaped interface
        env.update({"MASTER_ADDR": f"{SUBNET}.1", "GLOO_SOCKET_IFNAME": "eth0"})
    if os.path.exists(metrics):
        os.remove(metrics)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        raise UserError(f"bench {NAME}: run {' '.join(flags)} timed out after {args.timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if "setpgid" not in ln]
        tail = " | ".join([ln for ln in lines if ln.startswith("error:")][:1] or lines[-3:])
        raise UserError(f"bench {NAME}: run {' '.join(flags)} failed (exit {proc.returncode}): {tail}")
    records = read_jsonl(metrics)
    return {"records": records, "job_wall_s": time.perf_counter() - t0}


def to_target(records: List[Dict], target: float) -> Dict[str, Any]:
    """Training seconds, epochs and bytes up to the first epoch with val_acc >= target."""
    t = 0.0
    sent = 0
    curve = []
    hit = None
    for r in records:
        t += r["epoch_time_s"]
        sent += int(r.get("comm_bytes", 0))      # the exchangers count an order payload in it already
        curve.append((t, r["val_acc"]))
        if hit is None and r["val_acc"] >= target:
            hit = {"time_s": t, "epochs": r["epoch"], "bytes": sent}
    return {"hit": hit, "curve": curve, "best_val_acc": max(r["val_acc"] for r in records),
            "train_s": t, "bytes_total": sent}


def summarise(name: str, runs: List[Dict], target: float) -> Dict[str, Any]:
    per_seed = [to_target(r["records"], target) for r in runs]
    hits = [p["hit"] for p in per_seed if p["hit"] is not None]
    out: Dict[str, Any] = {"reached": f"{len(hits)}/{len(runs)}",
                           "best_val_acc": [round(p["best_val_acc"], 4) for p in per_seed],
                           "train_s_total": [round(p["train_s"], 2) for p in per_seed],
                           "job_wall_s": [round(r["job_wall_s"], 1) for r in runs],
                           "curves": [p["curve"] for p in per_seed]}
    if 2 * len(hits) >= len(runs) and hits:
        out.update({"time_to_target_s": float(np.median([h["time_s"] for h in hits])),
                    "epochs_to_target": float(np.median([h["epochs"] for h in hits])),
                    "bytes_to_target": float(np.median([h["bytes"] for h in hits])),
                    "time_to_target_s_seeds": [round(h["time_s"], 2) for h in hits]})
    else:
        out.update({"time_to_target_s": None, "epochs_to_target": None, "bytes_to_target": None})
    return out


def _exit_on_term(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _over(summary: Dict[str, Dict], reference: str) -> Optional[Dict[str, Any]]:
    """Fastest configuration other than ``reference`` and its time / the reference's time."""
    ref = summary.get(reference, {}).get("time_to_target_s")
    others = {n: c["time_to_target_s"] for n, c in summary.items() if n not in (reference, "horovod")
              and c["time_to_target_s"]}
    if not ref or not others:
        return None
    best = min(others, key=others.get)
    return {"config": best, "ratio": others[best] / ref}


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for k, (name, cfg) in enumerate(result["configs"].items()):
        for s, curve in enumerate(cfg["curves"]):
            ax.plot([c[0] for c in curve], [c[1] for c in curve], color=f"C{k % 10}", marker="o", ms=2.5,
                    lw=2 if name == result["baseline"] else 1, alpha=0.9,
                    label=name if s == 0 else None, ls="-" if k < 10 else "--")
    ax.axhline(result["target"], color="grey", ls=":", lw=1, label=f"target {result['target']:.3f}")
    ax.set_xlabel("training wall time (s, sum of epoch times)")
    ax.set_ylabel("validation accuracy")
    ratio = result["best_over_baseline"]
    ax.set_title(f"{result['hosts']} emulated hosts at {result['rate']}, {result['model']} on "
                 f"Fashion-MNIST ({result['train_size']} images)"
                 + (f", straggler {result['straggler']}" if result["straggler"] else "") + "; best/baseline "
                 + (f"{ratio:.2f} ({result['best_config']})" if ratio else "n/a"), fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fileio.save_figure(fig, path, dpi=110)
    plt.close(fig)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m benchmarks {NAME}", description=__doc__.splitlines()[0],
                       epilog="\n".join(__doc__.splitlines()[2:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=positive_int, default=None,
                   help="emulated hosts = ranks (default 8; 4 quick)")
    p.add_argument("--rate", default="1gbit", help="link rate (default: %(default)s)")
    p.add_argument("--out", required=True, help=f"directory for {NAME}.json and {NAME}.png")
    p.add_argument("--quick", action="store_true",
                   help="4 hosts, 2 seeds, 8 configurations, 3200 images, 5 epochs")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="seeds per configuration (default 3; 2 quick)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs per run (default 10; 5 quick)")
    p.add_argument("--train-size", type=positive_int, default=None,
                   help="training images (default 19200; 3200 quick)")
    p.add_argument("--target", type=positive_float, default=None,
                   help="target validation accuracy (default: 0.97 x the baseline's best, median over seeds)")
    p.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    p.add_argument("--baseline", default="horovod",
                   help="the reference configuration (default: %(default)s)")
    p.add_argument("--straggler", default=None, metavar="RANK:FACTOR",
                   help="one slow host: the trainer's --straggler in every configuration")
    p.add_argument("--model", default="cnn", help="built-in model (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="examples per rank per step (default: %(default)s)")
    p.add_argument("--timeout", type=positive_float, default=900,
                   help="seconds per run (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="debug logging")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    args.hosts = args.hosts or (4 if args.quick else 8)
    args.seeds = args.seeds or (2 if args.quick else 3)
    args.epochs = args.epochs or (5 if args.quick else 10)
    args.train_size = args.train_size or (3200 if args.quick else 19200)
    if args.hosts < 2:
        raise UserError("--hosts must be >= 2")
    if args.target is not None and args.target > 1:
        raise UserError(f"--target must be a fraction in (0, 1], got {args.target}")
    if os.geteuid() != 0:
        raise UserError(f"bench {NAME} needs root: it builds emulated hosts with launch/netem")
    table = configs(args.quick)
    if args.configs:
        wanted = [c for c in args.configs.split(",") if c]
        unknown = [c for c in wanted if c not in table]
        if unknown:
            raise UserError(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(table)}")
        table = {k: v for k, v in table.items() if k in wanted}
    baseline = args.baseline
    horovod_note = None
    if not horovod_available() and "horovod" in table:
        horovod_note = "horovod.torch does not import: plain-MPI all-reduce replaces it"
        table.pop("horovod")
        baseline = "allreduce" if baseline == "horovod" else baseline
        table.setdefault("allreduce", ["--sync", "allreduce"])
    if args.straggler:
        try:
            parse_straggler(args.straggler, args.hosts)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        refused = [n for n in table if n.startswith(DDP)]
        if refused:
            raise UserError(f"--straggler: the DDP runner has no straggler; leave out {', '.join(refused)}")
    if baseline not in table:
        raise UserError(f"--configs must include the baseline {baseline}")
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    data = make_data(os.path.join(args.out, "data"), args.train_size, args.hosts, seed=0)
    status = netem("status", "--json")
    if status.returncode == 0 and json.loads(status.stdout)["namespaces"]:
        raise UserError("an emulation is already up (launch/netem status): not touching it")
    start = time.perf_counter()
    runs: Dict[str, List[Dict]] = {name: [] for name in table}
    old_term = signal.signal(signal.SIGTERM, _exit_on_term)       # so that `finally` tears down
    try:
        up = netem("up", str(args.hosts), "--rate", args.rate, "--subnet", SUBNET)
        if up.returncode != 0:
            raise UserError(f"bench {NAME}: launch/netem up failed: {up.stderr.strip().splitlines()[-1]}")
        link = json.loads(netem("status", "--json").stdout)["state"].get("check")
        order = [baseline] + [n for n in table if n != baseline]
        for seed in range(args.seeds):          # configurations interleaved seed by seed
            for name in order:
                stem = name.replace('%', 'pc').replace('+', '_')
                metrics = os.path.join(args.out, "runs", f"{stem}-s{seed}.jsonl")
                t0 = time.perf_counter()
                runs[name].append(train_once(args, data, table[name], seed, metrics))
                log.info("%-18s seed %d: best val_acc %.4f, train %.1f s (job %.1f s)", name, seed,
                         max(r["val_acc"] for r in runs[name][-1]["records"]),
                         sum(r["epoch_time_s"] for r in runs[name][-1]["records"]), time.perf_counter() - t0)
    finally:
        netem("down")
        signal.signal(signal.SIGTERM, old_term)
    target = args.target or 0.97 * float(np.median([max(r["val_acc"] for r in run["records"])
                                                   for run in runs[baseline]]))
    summary = {name: summarise(name, rs, target) for name, rs in runs.items()}
    for name, cfg in summary.items():
        cfg["flags"] = table[name]
    base_s = summary[baseline]["time_to_target_s"]
    others = {n: c["time_to_target_s"] for n, c in summary.items() if n != baseline and c["time_to_target_s"]}
    best = min(others, key=others.get) if others else None
    for cfg in summary.values():
        t = cfg["time_to_target_s"]
        cfg["over_baseline"] = t / base_s if t and base_s else None
    result = {"benchmark": NAME, "hosts": args.hosts, "rate": args.rate, "link_check": link,
              "straggler": args.straggler,
              "model": args.model,
              "train_size": args.train_size, "epochs": args.epochs, "seeds": args.seeds, "lr": args.lr,
              "batch_size": args.batch_size, "target": target, "target_rule": "given" if args.target else
              "0.97 x baseline best val_acc (median over seeds)", "baseline": baseline,
              "horovod_note": horovod_note,
              "baseline_s": base_s, "best_config": best,
              "best_over_baseline": (others[best] / base_s) if best and base_s else None,
              "goal": "best_over_baseline <= 0.33",
              # the same ratio against the strongest synchronous reference, plain-MPI all-reduce
              "best_over_allreduce": _over(summary, "allreduce"), "cores": os.cpu_count(), "configs": summary,
              "elapsed_s": round(time.perf_counter() - start, 1),
              "note": "times are training-loop seconds (sum of epoch_time_s); one rank per emulated host, "
                      "all hosts sharing this machine's cores"}
    fileio.write_json(os.path.join(args.out, f"{NAME}.json"), result)
    plot(result, os.path.join(args.out, f"{NAME}.png"))
    print(f"target val_acc {target:.4f}; {args.hosts} hosts at {args.rate}; baseline {baseline}")
    print(f"{'config':<20} {'reached':>7} {'time s':>8} {'x base':>7} {'epochs':>6} {'MB sent':>9} "
          f"{'best acc':>9}")
    for name, cfg in summary.items():
        t = cfg["time_to_target_s"]
        print(f"{name:<20} {cfg['reached']:>7} {t if t is not None else float('nan'):8.2f} "
              f"{cfg['over_baseline'] if cfg['over_baseline'] else float('nan'):7.2f} "
              f"{cfg['epochs_to_target'] if cfg['epochs_to_target'] else float('nan'):6.1f} "
              f"{(cfg['bytes_to_target'] or float('nan')) / 1e6:9.2f} {max(cfg['best_val_acc']):9.4f}")
    print(f"best_over_allreduce {result['best_over_allreduce']}")
    print(f"best_over_baseline {result['best_over_baseline']} ({best}); "
          f"wrote {os.path.join(args.out, NAME + '.json')} ({result['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    run_main(main)
