"""GradAlign vs small-/large-batch SGD and local SGD (FedAvg) on a by-class Fashion-MNIST split."""
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
import torch
from torch import nn

from benchmarks.checkout import child_env, mpi_command
from hpc_dgrab import fileio
from hpc_dgrab.cli import ArgumentParser, UserError, positive_float, positive_int, run_main, setup_logging

log = logging.getLogger(__name__)

NAME = "gradalign"

EPILOG = """\
One MPI job (launch/local -n RANKS, one torch thread per rank) runs every method and seed on the
same shards: a seeded subsample of Fashion-MNIST split by class (5 ranks: 2 classes each), the
held-out validation images of all classes. Per epoch every method sees the same examples in the
same order; all use plain SGD (no momentum) with the same --lr:
  sgd-small      synchronous SGD, per-rank batch B                   (GradAlign beta 0, K 1, batch B)
  sgd-large      synchronous SGD, per-rank batch K*B                 (GradAlign beta 0, K 1, batch K*B)
  fedavg-K       K local steps of batch B, then model averaging      (GradAlign beta 0, K, batch B)
  gradalign-K-b  the same with the displacement beta                 (gradient at x on the K*B examples)
  gradalign-1-b  K = 1 on the large batch K*B (compare with sgd-large)
Accuracy = the (shared) model on the whole validation set after every epoch; mean and spread over
seeds. beta = lr/2 is the value the theory points to; the other betas are a small grid around it
(picking the best of a grid on the validation set flatters the method: gain_at_lr_half does not).
"""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m benchmarks {NAME}", description=__doc__.splitlines()[0],
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=positive_int, default=5, help="MPI ranks (default: %(default)s)")
    p.add_argument("--train-size", type=positive_int, default=8000,
                   help="training images (default: %(default)s)")
    p.add_argument("--val-size", type=positive_int, default=2000,
                   help="validation images (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=6,
                   help="epochs per method and seed (default: %(default)s)")
    p.add_argument("--seeds", type=positive_int, default=2, help="number of seeds (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=0.1, help="learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=40, help="small batch B (default: %(default)s)")
    p.add_argument("--local-steps", type=positive_int, default=10,
                   help="local steps K per round (default: %(default)s)")
    p.add_argument("--betas", default=None, help="beta grid for K local steps (default: lr/4, lr/2, lr)")
    p.add_argument("--betas-k1", default=None, help="beta grid for K = 1 (default: lr/4, lr/2)")
    p.add_argument("--model", default="cnn", help="built-in model: logreg, mlp, cnn (default: %(default)s)")
    p.add_argument("--timeout", type=positive_float, default=1800,
                   help="seconds for the MPI job (default: %(default)s)")
    p.add_argument("--out", required=True, help=f"directory for {NAME}.json and {NAME}.png")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run as one MPI rank
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="debug logging")
    return p


def _grid(text: Optional[str], default: List[float], flag: str) -> List[float]:
    if text is None:
        return default
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected a comma list of numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise UserError(f"{flag}: expected non-negative numbers, got {text!r}")
    return values


def methods(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """The compared configurations (name, beta, K, batch)."""
    b, k, lr = args.batch_size, args.local_steps, args.lr
    out = [{"name": "sgd-small", "beta": 0.0, "k": 1, "batch": b},
           {"name": "sgd-large", "beta": 0.0, "k": 1, "batch": k * b},
           {"name": f"fedavg-{k}", "beta": 0.0, "k": k, "batch": b}]
    for beta in _grid(args.betas, [lr / 4, lr / 2, lr], "--betas"):
        out.append({"name": f"gradalign-{k}-b{beta:g}", "beta": beta, "k": k, "batch": b})
    for beta in _grid(args.betas_k1, [lr / 4, lr / 2], "--betas-k1"):
        out.append({"name": f"gradalign-1-b{beta:g}", "beta": beta, "k": 1, "batch": k * b})
    return out


# ----------------------------------------------------------------------------- one MPI rank
@torch.no_grad()
def _accuracy(model: nn.Module, val: Any, comm: Any) -> float:
    model.eval()
    tot = np.zeros(2)
    for lo in range(0, len(val), 500):
        x, y = val.get_batch(np.arange(lo, min(lo + 500, len(val))))
        tot += ((model(x).argmax(1) == y).sum().item(), len(y))
    comm.Allreduce(tot.copy(), tot)
    return float(tot[0] / tot[1])


def worker(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    import hpc_dgrab as hd
    from hpc_dgrab.data import ShardDataset
    from hpc_dgrab.models import build_model

    hd.init()
    comm = MPI.COMM_WORLD
    rank, size = hd.rank(), hd.size()
    train = ShardDataset(args.data, rank, size, split="train")
    val = ShardDataset(args.data, rank, size, split="val")
    round_examples = args.local_steps * args.batch_size
    per_epoch = comm.allreduce(len(train) // round_examples, op=MPI.MIN) * round_examples
    if per_epoch == 0:
        raise UserError(f"a shard has fewer than K*B = {round_examples} examples; use a larger --train-size",
                        collective=True)
    results = []
    for seed in range(args.seeds):
        for m in methods(args):
            model = build_model(args.model, train.input_shape, train.num_classes, seed=seed)
            opt = torch.optim.SGD(model.parameters(), lr=args.lr)
            driver = hd.GradAlign(model, opt, nn.functional.cross_entropy, m["beta"], m["k"])
            rng = np.random.default_rng(1000 * seed + rank)   # same order for every method
            accs, losses = [], []
            t0 = time.perf_counter()
            for _ in range(args.epochs):
                order = rng.permutation(len(train))[:per_epoch]
                per_round = m["k"] * m["batch"]
                loss = 0.0
                rounds = per_epoch // per_round
                for r in range(rounds):
                    chunk = order[r * per_round:(r + 1) * per_round]
                    b = m["batch"]
                    batches = [train.get_batch(chunk[j * b:(j + 1) * b]) for j in range(m["k"])]
                    loss += driver.round(batches)
                losses.append(comm.allreduce(loss / rounds) / size)
                accs.append(_accuracy(model, val, comm))
                if not np.isfinite(losses[-1]):
                    accs += [accs[-1]] * (args.epochs - len(accs))
                    losses += [float("nan")] * (args.epochs - len(losses))
                    break
            elapsed = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            results.append({**m, "seed": seed, "val_acc": accs, "train_loss": losses, "time_s": elapsed})
            if rank == 0:
                log.info("seed %d %-18s val_acc %s  (%.0f s)", seed, m["name"],
                         " ".join(f"{100 * a:.1f}" for a in accs), elapsed)
    if rank == 0:
        fileio.write_json(args.worker, {"ranks": size, "examples_per_rank_epoch": per_epoch,
                                        "class_counts": [], "results": results})
    return 0


# ----------------------------------------------------------------------------- the driver
def summarize(raw: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    by: Dict[str, List[dict]] = {}
    for r in raw["results"]:
        by.setdefault(r["name"], []).append(r)
    table = {}
    for name, runs in by.items():
        acc = np.array([r["val_acc"] for r in runs])
        table[name] = {"beta": runs[0]["beta"], "local_steps": runs[0]["k"], "batch": runs[0]["batch"],
                       "val_acc_mean": acc.mean(0).tolist(), "val_acc_std": acc.std(0).tolist(),
                       "final_acc_mean": float(acc[:, -1].mean()), "final_acc_seeds": acc[:, -1].tolist(),
                       "last2_acc_mean": float(acc[:, -2:].mean()),
                       "train_loss_mean": np.array([r["train_loss"] for r in runs]).mean(0).tolist(),
                       "time_s_mean": float(np.mean([r["time_s"] for r in runs]))}
    k = args.local_steps
    fed = table[f"fedavg-{k}"]["final_acc_mean"]
    large = table["sgd-large"]["final_acc_mean"]
    ga_k = {n: t for n, t in table.items() if n.startswith(f"gradalign-{k}-")}
    ga_1 = {n: t for n, t in table.items() if n.startswith("gradalign-1-")}
    half = f"{args.lr / 2:g}"

    def best(d: Dict[str, Any]) -> Optional[str]:
        return max(d, key=lambda n: d[n]["final_acc_mean"]) if d else None

    bk, b1 = best(ga_k), best(ga_1)
    return {
        "benchmark": NAME, "ranks": raw["ranks"], "partition": "by-class", "model": args.model,
        "train_size": args.train_size, "val_size": args.val_size, "epochs": args.epochs, "seeds": args.seeds,
        "lr": args.lr, "batch_size": args.batch_size, "local_steps": k,
        "examples_per_rank_epoch": raw["examples_per_rank_epoch"],
        "final_acc": {n: t["final_acc_mean"] for n, t in table.items()},
        "gain_k_best_vs_fedavg": (ga_k[bk]["final_acc_mean"] - fed) if bk else None, "best_k": bk,
        "gain_k_at_lr_half_vs_fedavg": (table[f"gradalign-{k}-b{half}"]["final_acc_mean"] - fed)
        if f"gradalign-{k}-b{half}" in table else None,
        "gain_k1_best_vs_large": (ga_1[b1]["final_acc_mean"] - large) if b1 else None, "best_k1": b1,
        "gain_k1_at_lr_half_vs_large": (table[f"gradalign-1-b{half}"]["final_acc_mean"] - large)
        if f"gradalign-1-b{half}" in table else None,
        # the mean over the last two epochs and the seeds: less sensitive to one epoch's swing
        "gain_k_at_lr_half_vs_fedavg_last2": (table[f"gradalign-{k}-b{half}"]["last2_acc_mean"]
                                              - table[f"fedavg-{k}"]["last2_acc_mean"])
        if f"gradalign-{k}-b{half}" in table else None,
        "gain_k1_at_lr_half_vs_large_last2": (table[f"gradalign-1-b{half}"]["last2_acc_mean"]
                                              - table["sgd-large"]["last2_acc_mean"])
        if f"gradalign-1-b{half}" in table else None,
        "methods": table,
        "note": "val accuracy of the shared model; means over seeds; taken on a busy shared 2-core machine "
                "(times are not comparable across methods run at different moments)",
    }


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    k = result["local_steps"]
    panels = ((axes[0], f"gradalign-{k}-", f"fedavg-{k}"), (axes[1], "gradalign-1-", "sgd-large"))
    for ax, prefix, base in panels:
        for name, t in result["methods"].items():
            if not (name.startswith(prefix) or name in (base, "sgd-small")):
                continue
            ep = np.arange(1, len(t["val_acc_mean"]) + 1)
            mean, std = np.array(t["val_acc_mean"]) * 100, np.array(t["val_acc_std"]) * 100
            style = "--" if name in (base, "sgd-small") else "-"
            ax.plot(ep, mean, style, marker="o", ms=3, label=name)
            ax.fill_between(ep, mean - std, mean + std, alpha=0.12)
        ax.set_xlabel("epoch")
        ax.set_title(f"K = {k} local steps" if prefix.startswith(f"gradalign-{k}") else "K = 1 (large batch)",
                     fontsize=10)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation accuracy (%)")
    fig.suptitle(f"{result['ranks']} ranks, by-class Fashion-MNIST ({result['train_size']} images), "
                 f"{result['seeds']} seeds, lr {result['lr']:g}", fontsize=10)
    fig.tight_layout()
    fileio.save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    methods(args)  # validate the grids before launching anything
    if args.worker:
        return worker(args)
    from benchmarks.straggler import make_data

    os.makedirs(args.out, exist_ok=True)
    data = make_data(os.path.join(args.out, "data"), args.train_size, args.ranks, seed=0,
                     partition="by-class", held_out=args.val_size)
    raw_path = os.path.join(args.out, f"{NAME}-raw.json")
    own_args = list(argv if argv is not None else sys.argv[2:])
    cmd = mpi_command(args.ranks) + [sys.executable, "-m", "benchmarks", NAME, "--worker", raw_path,
                                     "--data", data] + own_args
    env = child_env()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.timeout, stdout=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired:
        raise UserError(f"bench {NAME}: the MPI job timed out after {args.timeout:.0f} s") from None
    if proc.returncode != 0:
        raise UserError(f"bench {NAME}: the MPI job failed (exit {proc.returncode})")
    report(args, raw_path, wall_s=time.perf_counter() - t0)
    return 0


def report(args: argparse.Namespace, raw_path: str, wall_s: Optional[float] = None) -> Dict[str, Any]:
    """Summarize the worker's raw results into NAME.json + NAME.png and print the table."""
    with open(raw_path) as fh:
        raw = json.load(fh)
    result = summarize(raw, args)
    result["wall_s"] = wall_s
    fileio.write_json(os.path.join(args.out, f"{NAME}.json"), result)
    plot(result, os.path.join(args.out, f"{NAME}.png"))
    print(f"{'method':<22} " + " ".join(f"ep{e + 1:>2}" for e in range(args.epochs)) + "   final (seeds)")
    for name, t in result["methods"].items():
        print(f"{name:<22} " + " ".join(f"{100 * a:4.1f}" for a in t["val_acc_mean"])
              + "   " + ", ".join(f"{100 * a:.1f}" for a in t["final_acc_seeds"]))
    for key in ("gain_k_at_lr_half_vs_fedavg", "gain_k_best_vs_fedavg", "gain_k_at_lr_half_vs_fedavg_last2",
                "gain_k1_at_lr_half_vs_large", "gain_k1_best_vs_large", "gain_k1_at_lr_half_vs_large_last2"):
        if result[key] is not None:
            print(f"{key:<36} {100 * result[key]:+.2f} points")
    return result


if __name__ == "__main__":
    run_main(main)
