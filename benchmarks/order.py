"""D-GraB vs D-RR on real data: the trainer on 4 ranks, several seeds, train loss / accuracy / cost.

Writes a Fashion-MNIST subsample as iid shards (one per rank), then launches
``launch/local -n RANKS -- python -m hpc_dgrab.train ... --order {rr,dgrab} --dgrab-mode MODE``
for every seed and method (methods interleaved per seed so machine load hits them alike) and
reads the metrics files. Reports per method: final train loss, val accuracy, epochs to reach the
target loss (default: D-RR's mean final train loss), epoch time relative to D-RR in the same run, and
ordering bytes per step against gradient bytes per step (per rank); epoch times are medians over
epochs and seeds. Because whole-epoch times on a
shared machine are noisy, it also times one rank's step in-process (``step_time_ratio``: median of
interleaved repetitions of the trainer's step, ``DistributedOptimizer`` + ``OrderedSampler``, with
each sorter over the step with D-RR, in CPU time; one rank, so this is the sorter's compute
overhead (the exact mode's n-rank payload is not built); its communication overhead is the bytes
ratio).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from benchmarks.checkout import ROOT, child_env, launcher
from hpc_dgrab import fileio
from hpc_dgrab.cli import ArgumentParser, UserError, positive_float, positive_int, run_main, setup_logging
from hpc_dgrab.metrics import read_jsonl

log = logging.getLogger(__name__)

METHODS = {"rr": ["--order", "rr"],
           "dgrab-parallel": ["--order", "dgrab", "--dgrab-mode", "parallel"],
           "dgrab-parallel-half": ["--order", "dgrab", "--dgrab-mode", "parallel", "--dgrab-payload", "half"],
           "dgrab-exact": ["--order", "dgrab", "--dgrab-mode", "exact"]}


def make_data(out: str, ranks: int, per_rank: int, val: int, seed: int = 0) -> str:
    """Fashion-MNIST: ``ranks * per_rank`` random training images as iid shards + ``val`` test images."""
    from hpc_dgrab.data.shards import write_shards
    from hpc_dgrab.data.sources import SourceError, load_source

    path = os.path.join(out, f"fmnist-{ranks}x{per_rank}-s{seed}")
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    try:
        src = load_source("fashion-mnist")
    except SourceError as exc:
        raise UserError(str(exc)) from None
    if ranks * per_rank > len(src.y):
        raise UserError(f"--per-rank {per_rank} x {ranks} ranks exceeds the {len(src.y)} training images")
    idx = np.random.default_rng(seed).permutation(len(src.y))[:ranks * per_rank]
    parts = [np.sort(idx[r * per_rank:(r + 1) * per_rank]) for r in range(ranks)]
    write_shards(src, path, ranks, parts, x_val=src.x_test[:val], y_val=src.y_test[:val], seed=seed)
    return path


def run_one(data: str, method: str, seed: int, args: Any, metrics: str) -> List[Dict[str, Any]]:
    """One training run under mpirun; returns its per-epoch metrics records."""
    cmd = [launcher("local"), "-n", str(args.ranks), "--",
           sys.executable, "-m", "hpc_dgrab.train",
           "--data", data, "--model", args.model, "--epochs", str(args.epochs), "--lr", str(args.lr),
           "--momentum", str(args.momentum), "--batch-size", str(args.batch_size), "--seed", str(seed),
           "--metrics", metrics, "--progress", "off"] + METHODS[method]
    env = child_env()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"{method} seed {seed}: trainer failed ({tail})")
    recs = read_jsonl(metrics)
    log.info("%s seed %d: %d epochs in %.1fs, final train loss %.4f", method, seed, len(recs),
             time.perf_counter() - t0, recs[-1]["train_loss"])
    return recs


def _flag(flags: Sequence[str], name: str, default: str) -> str:
    return flags[flags.index(name) + 1] if name in flags else default


def step_overhead(data: str, args: Any, reps: int, methods: Sequence[str]) -> Dict[str, float]:
    """Median in-process step time of each method divided by D-RR's (see the module docstring).

    The step is the trainer's: ``DistributedOptimizer`` + ``OrderedSampler`` (``zero_grad``,
    ``sampler.backward``, one control payload, ``step``) on one rank of this process, the methods
    interleaved step by step; each step timed in this process's CPU time, so that other processes'
    load on a shared machine counts less."""
    import torch

    import hpc_dgrab as hd
    from hpc_dgrab.data.shards import ShardDataset
    from hpc_dgrab.models import build_model

    torch.set_num_threads(1)
    hd.init()
    shard = ShardDataset(data, 0, args.ranks, split="train")
    x, y = shard.get_batch(np.arange(min(len(shard), 64 * args.batch_size)))
    ce = torch.nn.functional.cross_entropy
    runs = {}
    for m in methods:
        flags = METHODS[m]
        model = build_model(args.model, shard.input_shape, shard.num_classes, seed=0)
        sampler = hd.OrderedSampler(len(x), order=flags[1], mode=_flag(flags, "--dgrab-mode", "parallel"),
                                    payload=_flag(flags, "--dgrab-payload", "full"),
                                    batch_size=args.batch_size)
        opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-6, momentum=args.momentum),
                                      model.named_parameters(), sampler=sampler)
        runs[m] = (model, sampler, opt)
    times: Dict[str, List[float]] = {m: [] for m in methods}
    steps = len(x) // args.batch_size
    b = args.batch_size
    for rep in range(reps):
        k = rep % steps
        for m, (model, sampler, opt) in runs.items():
            if rep and k == 0:
                sampler.set_epoch(sampler.epoch + 1)
            idx = sampler.order()[k * b:(k + 1) * b]
            t0 = time.process_time()
            opt.zero_grad()
            sampler.backward(model, ce, x[idx], y[idx], indices=idx)
            opt.add_payload(torch.zeros(2))
            opt.step()
            times[m].append(time.process_time() - t0)
    base = float(np.median(times["rr"])) if "rr" in times else float("nan")
    return {m: float(np.median(v)) / base for m, v in times.items()}


def sign_agreement(model: Any, x: Any, y: Any, batch: int) -> Dict[str, Any]:
    """Signs of the inner-product balancing (the sorters' path) against today's d-vector reference.

    On a fixed model, one epoch of single-rank D-GraB (= PairBalance) over ``x`` in batches of
    ``batch`` through ``balance_step``, and for every pair the reference sign
    ``balance_sign(s, g_a - g_b)`` from materialised ``torch.func`` per-example gradients against the
    same running sum. Returns the pair count, the mismatches, the smallest |cos(s, c)| among all
    pairs and the largest among mismatches (a mismatch is a tie within rounding when that is tiny),
    and whether the next order equals :func:`~hpc_dgrab.order.balance.pair_balance`'s on the
    materialised gradients.
    """
    import torch

    from hpc_dgrab.order import make_sorter
    from hpc_dgrab.order.balance import balance_sign, pair_balance
    from hpc_dgrab.order.units import per_example_gradients

    ce = torch.nn.functional.cross_entropy
    n = len(x)
    _, dense_t = per_example_gradients(model, lambda o, t: ce(o, t), x, y)  # the torch.func path
    dense = dense_t.double().numpy()
    sorter = make_sorter("dgrab", n)
    order = sorter.epoch_order().copy()
    ref_order, _ = pair_balance(dense, order)
    pairs = mismatches = 0
    min_cos, max_cos_mismatch = float("inf"), 0.0
    pending = None
    for lo in range(0, n, batch):
        idx = order[lo:lo + batch]
        s0 = np.zeros(dense.shape[1]) if sorter.running_sum is None else sorter.running_sum.copy()
        _, _, payload = sorter.balance_step(model, ce, x[idx], y[idx], idx)
        sorter.apply_payload(payload)
        got = sorter.signs[-1]
        rows = ([pending] if pending is not None else []) + [dense[int(i)] for i in idx]
        pending = rows.pop() if len(rows) % 2 else None
        s_loc = s0
        for k in range(0, len(rows), 2):
            c = rows[k] - rows[k + 1]
            e = balance_sign(s_loc, c)
            norm = float(np.linalg.norm(s_loc) * np.linalg.norm(c))
            cos = abs(float(s_loc @ c)) / norm if norm else 0.0
            min_cos = min(min_cos, cos)
            if e != int(got[k // 2]):
                mismatches += 1
                max_cos_mismatch = max(max_cos_mismatch, cos)
            s_loc = s_loc + e * c
            pairs += 1
    sorter.end_epoch()
    return {"pairs": pairs, "mismatches": mismatches, "min_abs_cos": min_cos,
            "max_abs_cos_at_mismatch": max_cos_mismatch,
            "same_order": bool(np.array_equal(sorter.epoch_order(), ref_order))}


GOAL_TIME, GOAL_BYTES = 1.15, 1.5


def real_sign_agreement(data: str, args: Any, examples: int = 256) -> Dict[str, Any]:
    """:func:`sign_agreement` on rank 0's shard with the benchmark's model after a few plain SGD
    steps (so the gradients are those of a model in training, not of its initialisation)."""
    import torch

    from hpc_dgrab.data.shards import ShardDataset
    from hpc_dgrab.models import build_model

    torch.manual_seed(0)
    shard = ShardDataset(data, 0, args.ranks, split="train")
    x, y = shard.get_batch(np.arange(min(len(shard), examples)))
    model = build_model(args.model, shard.input_shape, shard.num_classes, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    for lo in range(0, len(x), args.batch_size):
        opt.zero_grad()
        hi = lo + args.batch_size
        torch.nn.functional.cross_entropy(model(x[lo:hi]), y[lo:hi]).backward()
        opt.step()
    return {"model": args.model, "examples": len(x), "batch": args.batch_size,
            **sign_agreement(model, x, y, args.batch_size)}


def goals(summary: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Each D-GraB (parallel) variant against D-RR: epoch time (whole-epoch and in-process step
    ratios) and bytes per step, each met or missed; and the signs against materialised gradients."""
    out: Dict[str, Dict[str, Any]] = {}
    if "rr" not in summary["methods"]:
        return out
    for method, tag in (("dgrab-parallel", "dgrab"), ("dgrab-parallel-half", "dgrab_half")):
        res = summary["methods"].get(method)
        if res is None:
            continue
        for key, label in (("epoch_time_ratio_vs_rr", "epoch_time"), ("step_time_ratio_vs_rr", "step_time")):
            if res.get(key) is not None:
                out[f"{tag}_{label}_vs_rr"] = {"value": res[key], "rule": f"<= {GOAL_TIME}",
                                               "met": res[key] <= GOAL_TIME}
        total = 1.0 + (res["order_bytes_ratio"] or 0.0)
        out[f"{tag}_bytes_per_step_vs_rr"] = {"value": total, "rule": f"<= {GOAL_BYTES}",
                                              "met": total <= GOAL_BYTES}
    agree = summary.get("sign_agreement")
    if agree:
        out["same_signs_as_materialised_gradients"] = {
            "value": agree["mismatches"], "rule": "0 mismatches except ties within rounding",
            "met": agree["mismatches"] == 0 or agree["max_abs_cos_at_mismatch"] < 1e-6}
    return out


def summarize(runs: Dict[str, Dict[int, List[Dict[str, Any]]]], target: Optional[float]) -> Dict[str, Any]:
    """Per-method summary over seeds (see the module docstring)."""
    curves = {m: np.array([[r["train_loss"] for r in recs] for recs in by_seed.values()])
              for m, by_seed in runs.items()}
    if target is None:
        target = float(curves["rr"][:, -1].mean()) if "rr" in curves else float("nan")
    base_time = None
    if "rr" in runs:  # medians: a shared machine's load spikes hit single epochs
        base_time = float(np.median([r["epoch_time_s"] for recs in runs["rr"].values() for r in recs]))
    out: Dict[str, Any] = {"target_loss": target, "methods": {}}
    for m, by_seed in runs.items():
        recs_all = [r for recs in by_seed.values() for r in recs]
        reach = []
        for recs in by_seed.values():
            hit = [r["epoch"] for r in recs if r["train_loss"] <= target]
            reach.append(hit[0] if hit else None)
        steps_ranks = np.array([r["steps"] * r["ranks"] for r in recs_all], dtype=np.float64)
        order_b = np.array([r.get("order_bytes", 0) for r in recs_all], dtype=np.float64)
        comm_b = np.array([r["comm_bytes"] for r in recs_all], dtype=np.float64)
        epoch_time = float(np.mean([r["epoch_time_s"] for r in recs_all]))
        grad_per_step = float(np.mean((comm_b - order_b) / steps_ranks))
        order_per_step = float(np.mean(order_b / steps_ranks))
        final = curves[m][:, -1]
        out["methods"][m] = {
            "final_train_loss": float(final.mean()), "final_train_loss_std": float(final.std()),
            "final_train_loss_per_seed": final.tolist(),
            "val_acc": float(np.mean([recs[-1]["val_acc"] for recs in by_seed.values()])),
            "val_loss": float(np.mean([recs[-1]["val_loss"] for recs in by_seed.values()])),
            "epochs_to_target": reach,
            "epoch_time_s": epoch_time,
            "epoch_time_median_s": float(np.median([r["epoch_time_s"] for r in recs_all])),
            "epoch_time_ratio_vs_rr": float(np.median([r["epoch_time_s"] for r in recs_all])) / base_time
            if base_time else None,
            "grad_bytes_per_step": grad_per_step, "order_bytes_per_step": order_per_step,
            "order_bytes_ratio": order_per_step / grad_per_step if grad_per_step else None,
            "train_loss_curve": curves[m].mean(0).tolist(),
        }
    return out


def plot(summary: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, res in summary["methods"].items():
        curve = res["train_loss_curve"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, label=m)
    ax.axhline(summary["target_loss"], color="grey", lw=0.8, ls="--", label="target")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (mean over seeds)")
    ax.set_title("Fashion-MNIST subsample, D-GraB vs D-RR")
    ax.legend()
    fig.tight_layout()
    fileio.save_figure(fig, path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks order", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (order.json, order.png, data, metrics)")
    p.add_argument("--ranks", type=positive_int, default=4,
                   help="MPI ranks per training run (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of " + ",".join(METHODS) + " (default: all)")
    p.add_argument("--model", default="logreg",
                   help="built-in model: logreg, mlp, cnn (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=8, help="epochs per run (default: %(default)s)")
    p.add_argument("--per-rank", type=positive_int, default=500, help="training images per rank")
    p.add_argument("--val", type=positive_int, default=2000, help="validation images (official test split)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="examples per rank per step")
    p.add_argument("--lr", type=positive_float, default=0.01, help="learning rate (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    p.add_argument("--target-loss", type=positive_float, default=None,
                   help="loss for epochs-to-target (default: D-RR's mean final train loss)")
    p.add_argument("--timeout", type=positive_float, default=900, help="seconds per training run")
    p.add_argument("--overhead-reps", type=positive_int, default=400,
                   help="in-process step repetitions for step_time_ratio (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.debug)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise UserError(f"--seeds: not a comma-separated list of integers: {args.seeds!r}") from None
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or not seeds:
        raise UserError(f"--methods: unknown {','.join(bad) or '(none)'}; choose from {','.join(METHODS)}")
    os.makedirs(args.out, exist_ok=True)
    data = make_data(os.path.join(args.out, "data"), args.ranks, args.per_rank, args.val)
    runs: Dict[str, Dict[int, List[Dict[str, Any]]]] = {m: {} for m in methods}
    t0 = time.perf_counter()
    for seed in seeds:
        for m in methods:
            runs[m][seed] = run_one(data, m, seed, args, os.path.join(args.out, f"metrics-{m}-s{seed}.jsonl"))
    summary = summarize(runs, args.target_loss)
    ratios = step_overhead(data, args, args.overhead_reps, ["rr"] + [m for m in methods if m != "rr"])
    for m, r in summary["methods"].items():
        r["step_time_ratio_vs_rr"] = ratios[m]
    summary["sign_agreement"] = real_sign_agreement(data, args)
    summary["goals"] = goals(summary)
    result = {"benchmark": "order", "data": "fashion-mnist", "ranks": args.ranks, "per_rank": args.per_rank,
              "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "momentum": args.momentum, "seeds": seeds, "seconds": time.perf_counter() - t0,
              "note": "timings from a shared, busy machine (2 cores, ranks oversubscribed); "
                      "compare ratios only",
              **summary}
    fileio.write_json(os.path.join(args.out, "order.json"), result)
    plot(summary, os.path.join(args.out, "order.png"))
    print(f"{args.ranks} ranks x {args.per_rank} Fashion-MNIST images, {args.model}, {args.epochs} epochs, "
          f"seeds {seeds}; target loss {summary['target_loss']:.4f}")
    print(f"  {'method':<15} {'train loss':>15} {'val acc':>8} {'epochs->target':>15} {'time/rr':>8} "
          f"{'step/rr':>8} {'order B/step':>13} {'grad B/step':>12}")
    for m, r in summary["methods"].items():
        ratio = r["epoch_time_ratio_vs_rr"]
        print(f"  {m:<15} {r['final_train_loss']:>8.4f}±{r['final_train_loss_std']:.4f} "
              f"{100 * r['val_acc']:>7.2f}% {str(r['epochs_to_target']):>15} "
              f"{(f'{ratio:.2f}' if ratio else '-'):>8} {r['step_time_ratio_vs_rr']:>8.2f} "
              f"{r['order_bytes_per_step']:>13.0f} "
              f"{r['grad_bytes_per_step']:>12.0f}")
    agree = summary["sign_agreement"]
    print(f"  signs vs materialised gradients ({agree['model']}, {agree['examples']} examples): "
          f"{agree['mismatches']} of {agree['pairs']} pairs differ, same order: {agree['same_order']}")
    for name, goal in summary["goals"].items():
        print(f"  goal {name}: {goal['value']:.3f} ({goal['rule']}) -> {'met' if goal['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    run_main(main)
