"""Scale past one machine by simulation: N virtual workers in one process, the library's own objects.

``python -m benchmarks simulate --out DIR [--workers 64,256,1024] [--quick]`` runs, for every
worker count N, with no MPI (every collective is a sum over the N workers in this process):

* **herding** (:mod:`benchmarks.herding`'s problem): N workers x ``--per-worker`` unit
  Gaussian vectors in 16 dimensions, centred per worker, balanced for ``--rounds`` rounds by N
  sorter objects each (D-GraB parallel, independent PairBalance, D-RR; the payloads summed like the
  all-reduce) and by the exact coordinated fold (:func:`~hpc_dgrab.order.balance.coordinated_pair_balance`);
  the herding bound after the last round, and how it grows with N;
* **RegTop-k linear regression** (:mod:`benchmarks.regtopk_linreg`'s problem, its N worker
  objects of the compressed exchanger): log10 ||w - x*||^2 after ``--linreg-rounds`` rounds for
  dense, Top-k and RegTop-k at k/d = 0.6, and the gap Top-k - RegTop-k;
* **training**: multinomial logistic regression on Fashion-MNIST, N workers with ``--train-per-worker``
  images each, one pair per worker per step (global batch 2N), D-GraB (parallel) sorters vs D-RR,
  the mean training loss of each epoch (the same seed, data and initial model for both).

Writes ``DIR/simulate.json`` and ``DIR/simulate.png``.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from hpc_dgrab import fileio
from hpc_dgrab.cli import ArgumentParser, UserError, positive_int, run_main, setup_logging

log = logging.getLogger(__name__)

_SOURCES: Dict[str, Any] = {}  # a data set loaded once per run
HERDING = ("dgrab-exact", "dgrab-parallel", "pairbalance", "rr")


def herding(workers: int, per_worker: int, rounds: int, seed: int = 0) -> Dict[str, float]:
    """Final herding bound per method (see the module docstring)."""
    from benchmarks.herding import make_vectors, run
    from hpc_dgrab.order import make_sorter
    from hpc_dgrab.order.balance import coordinated_pair_balance, herding_bound

    res = run(workers, per_worker, 16, rounds, seed, methods=("dgrab-parallel", "pairbalance", "rr"))
    out = {m: float(v[-1]) for m, v in res["bound"].items()}
    vectors = make_vectors(workers, per_worker, 16, seed)
    orders = [make_sorter("rr", per_worker, seed=seed, rank=j, world_size=workers).epoch_order()
              for j in range(workers)]
    for _ in range(rounds):
        orders, _ = coordinated_pair_balance(vectors, orders, "exact")
    out["dgrab-exact"] = herding_bound(vectors, orders)
    return out


def linreg(workers: int, rounds: int, seed: int = 0, density: float = 0.6) -> Dict[str, float]:
    """log10 ||w - x*||^2 after ``rounds`` rounds for dense, Top-k and RegTop-k."""
    from benchmarks.regtopk_linreg import LocalProblems, build_parser, initial_model, run_method
    from benchmarks.virtual import LocalCommunicator

    args = build_parser().parse_args(["--out", "-", "--workers", str(workers), "--rounds", str(rounds),
                                      "--density", str(density), "--seed", str(seed)])
    problems = LocalProblems(seed, list(range(workers)), workers, args.dim, args.samples)
    x_star = np.linalg.solve(problems.gram.sum(0).numpy(), problems.rhs.sum(0).numpy())
    w0 = initial_model(seed, args.dim)
    out = {}
    for method in ("dense", "topk", "regtopk"):
        r = run_method(method, problems, x_star, w0, args, LocalCommunicator())
        out[method] = float(r["log10_err"][-1])
    out["gap_topk_minus_regtopk"] = out["topk"] - out["regtopk"]
    return out


def training(workers: int, per_worker: int, epochs: int, lr: float, seed: int = 0) -> Dict[str, List[float]]:
    """Mean training loss per epoch, D-GraB (parallel) vs D-RR, N virtual workers (logistic regression)."""
    from hpc_dgrab.data.sources import SourceError, load_source
    from hpc_dgrab.order import make_sorter
    from hpc_dgrab.order.units import logreg_per_example

    src = _SOURCES.get("fashion-mnist")
    if src is None:
        try:
            src = _SOURCES["fashion-mnist"] = load_source("fashion-mnist")
        except SourceError as exc:
            raise UserError(str(exc)) from None
    n = workers * per_worker
    if n > len(src.y):
        raise UserError(f"{workers} workers x {per_worker} images exceed the {len(src.y)} training images")
    idx = np.random.default_rng(seed).permutation(len(src.y))[:n]
    x = torch.from_numpy(src.x[idx].reshape(n, -1).astype(np.float32) / 255.0)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.from_numpy(src.y[idx].astype(np.int64))
    xs, ys = x.reshape(workers, per_worker, -1), y.reshape(workers, per_worker)
    curves: Dict[str, List[float]] = {}
    for method in ("dgrab", "rr"):
        torch.manual_seed(seed)
        layer = torch.nn.Linear(x.shape[1], 10)
        sorters = [make_sorter(method, per_worker, seed=seed, rank=j, world_size=workers)
                   for j in range(workers)]
        curve = []
        for _ in range(epochs):
            orders = torch.from_numpy(np.stack([s.epoch_order() for s in sorters]))
            total_loss = 0.0
            for lo in range(0, per_worker - 1, 2):
                pick = orders[:, lo:lo + 2]                                   # (N, 2) local indices
                rows = pick[:, :, None].expand(-1, -1, xs.shape[2])
                bx = torch.gather(xs, 1, rows).reshape(2 * workers, -1)
                by = torch.gather(ys, 1, pick).reshape(-1)
                losses, g = logreg_per_example(layer, bx, by)                 # (2N,), (2N, d)
                total_loss += float(losses.sum())
                if method == "dgrab":
                    pays = [s.observe(g[2 * j:2 * j + 2], [(int(pick[j, 0]),), (int(pick[j, 1]),)])
                            for j, s in enumerate(sorters)]
                    summed = torch.stack(pays).sum(0)
                    for s in sorters:
                        s.apply_payload(summed)
                mean = g.mean(0)
                with torch.no_grad():
                    layer.weight -= lr * mean[:-10].reshape(10, -1)
                    layer.bias -= lr * mean[-10:]
            for s in sorters:
                s.end_epoch()
            curve.append(total_loss / (workers * (per_worker - per_worker % 2)))
        curves[method] = curve
    return curves


def _counts(text: str) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated worker counts, got {text!r}") from None
    if not vals or min(vals) < 2:
        raise argparse.ArgumentTypeError(f"worker counts must be >= 2, got {text!r}")
    return vals


def _growth(ns: Sequence[int], values: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(value) against log(N) (value ~ N^slope); None if not positive."""
    v = np.asarray(values, dtype=np.float64)
    if len(ns) < 2 or not np.all(v > 0):
        return None
    return float(np.polyfit(np.log(ns), np.log(v), 1)[0])


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = result["workers"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for m in HERDING:
        ax.loglog(ns, [result["herding"][str(n)][m] for n in ns], marker="o", label=m)
    ax.set_xlabel("virtual workers N")
    ax.set_ylabel("herding bound after the last round")
    ax.set_title("parallel herding (d = 16)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for m in ("dense", "topk", "regtopk"):
        ax.semilogx(ns, [result["linreg"][str(n)][m] for n in ns], marker="o", label=m)
    ax.set_xlabel("virtual workers N")
    ax.set_ylabel("log10 ||w - x*||^2 (last round)")
    ax.set_title(f"linear regression, k/d = 0.6, {result['config']['linreg_rounds']} rounds")
    ax.legend(fontsize=8)
    ax = axes[2]
    for k, n in enumerate(ns):
        c = result["training"][str(n)]
        ep = range(1, len(c["dgrab"]) + 1)
        ax.plot(ep, c["dgrab"], color=f"C{k}", marker="o", ms=3, label=f"D-GraB N={n}")
        ax.plot(ep, c["rr"], color=f"C{k}", ls="--", marker="x", ms=3, label=f"D-RR N={n}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss")
    ax.set_title("logistic regression, Fashion-MNIST")
    ax.legend(fontsize=7)
    fig.suptitle("N virtual workers in one process (the library's sorters and compressors)", fontsize=10)
    fig.tight_layout()
    fileio.save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks simulate", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for simulate.json and simulate.png")
    p.add_argument("--workers", type=_counts, default=[64, 256, 1024], help="virtual worker counts")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test, seconds)")
    p.add_argument("--per-worker", type=positive_int, default=40, help="herding vectors per worker")
    p.add_argument("--rounds", type=positive_int, default=6, help="herding rounds")
    p.add_argument("--linreg-rounds", type=positive_int, default=300, help="linear-regression rounds")
    p.add_argument("--train-per-worker", type=positive_int, default=16, help="training images per worker")
    p.add_argument("--epochs", type=positive_int, default=5, help="training epochs")
    p.add_argument("--lr", type=float, default=0.05, help="training learning rate (global batch 2N)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.debug)
    if args.quick:
        args.workers, args.per_worker, args.rounds = [4, 8], 10, 3
        args.linreg_rounds, args.train_per_worker, args.epochs = 30, 4, 2
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    result: Dict[str, Any] = {"benchmark": "simulate", "workers": args.workers,
                              "config": {k: getattr(args, k) for k in (
                                  "per_worker", "rounds", "linreg_rounds", "train_per_worker", "epochs", "lr",
                                  "seed")},
                              "herding": {}, "linreg": {}, "training": {}, "seconds": {}}
    for n in args.workers:
        t0 = time.perf_counter()
        result["herding"][str(n)] = herding(n, args.per_worker, args.rounds, args.seed)
        t1 = time.perf_counter()
        result["linreg"][str(n)] = linreg(n, args.linreg_rounds, args.seed)
        t2 = time.perf_counter()
        result["training"][str(n)] = training(n, args.train_per_worker, args.epochs, args.lr, args.seed)
        result["seconds"][str(n)] = {"herding": round(t1 - t0, 1), "linreg": round(t2 - t1, 1),
                                     "training": round(time.perf_counter() - t2, 1)}
        log.info("N=%d: herding %s, linreg gap %.2f, train loss dgrab %.4f rr %.4f", n,
                 {k: round(v, 2) for k, v in result["herding"][str(n)].items()},
                 result["linreg"][str(n)]["gap_topk_minus_regtopk"],
                 result["training"][str(n)]["dgrab"][-1], result["training"][str(n)]["rr"][-1])
    ns = args.workers
    result["growth"] = {
        "herding_bound_exponent": {m: _growth(ns, [result["herding"][str(n)][m] for n in ns])
                                   for m in HERDING},
        "regtopk_gap": [result["linreg"][str(n)]["gap_topk_minus_regtopk"] for n in ns],
        "note": "herding_bound_exponent: slope of log(bound) vs log(N); regtopk_gap: log10 error of "
                "Top-k minus RegTop-k at the last round, per N",
    }
    fileio.write_json(os.path.join(args.out, "simulate.json"), result)
    plot(result, os.path.join(args.out, "simulate.png"))
    print(f"{'N':>6} " + " ".join(f"{m:>15}" for m in HERDING) + f" {'topk':>7} {'regtopk':>8} {'gap':>6} "
          f"{'loss dgrab':>11} {'loss rr':>8}")
    for n in ns:
        h, lr_, tr = result["herding"][str(n)], result["linreg"][str(n)], result["training"][str(n)]
        print(f"{n:>6} " + " ".join(f"{h[m]:>15.3f}" for m in HERDING) +
              f" {lr_['topk']:>7.2f} {lr_['regtopk']:>8.2f} {lr_['gap_topk_minus_regtopk']:>6.2f} "
              f"{tr['dgrab'][-1]:>11.4f} {tr['rr'][-1]:>8.4f}")
    return 0


if __name__ == "__main__":
    run_main(main)
