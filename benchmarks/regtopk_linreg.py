"""Distributed linear regression: dense vs Top-k vs RegTop-k with error feedback (float64)."""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from benchmarks.virtual import Communicator, MPICommunicator, VirtualWorkers, worker_range
from hpc_dgrab import fileio
from hpc_dgrab.cli import ArgumentParser, UserError, positive_float, positive_int, run_main, setup_logging

log = logging.getLogger(__name__)

NAME = "regtopk-linreg"
METHODS = ("dense", "topk", "regtopk")
#: bench name -> compression method
_COMPRESS = {"dense": "none", "topk": "topk", "regtopk": "regtopk"}

EPILOG = """\
The experiment of the RegTop-k paper: N workers with S samples each of
y = A_k x_k + sqrt(0.5) noise, x_k = m_k * 1 + N(0, I), m_k ~ sqrt(5) N(0, 1), A_k ~ N(0, 1);
every round each worker sends its full-batch gradient of the mean squared error (compressed with
error feedback), the model moves by lr times the mean; metric log10 ||w - x*||^2 with x* the
pooled least-squares solution. Workers are spread over the ranks of the job (one per rank under
`launch/local -n N`, all N as virtual workers in one process without mpirun), using the same
worker objects either way. Every rank builds only its own workers' data from (seed, worker), so
the result does not depend on the rank count. Wire bytes count what every rank hands to the
network (the dense method sums a rank's virtual workers before its all-reduce). The JSON keeps
log10_err after every round (no subsampling).

examples:
  python -m benchmarks regtopk-linreg --out runs/bench
  launch/local -n 20 -- python -m benchmarks regtopk-linreg --out runs/bench
"""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m benchmarks {NAME}", description=__doc__.splitlines()[0],
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=positive_int, default=20,
                   help="number of workers N (default: %(default)s)")
    p.add_argument("--dim", type=positive_int, default=100, help="model dimension d (default: %(default)s)")
    p.add_argument("--samples", type=positive_int, default=500,
                   help="samples per worker (default: %(default)s)")
    p.add_argument("--density", type=positive_float, default=0.6, help="k / d (default: %(default)s)")
    p.add_argument("--mu", type=positive_float, default=4.0, help="RegTop-k mu (default: %(default)s)")
    p.add_argument("--q", type=positive_float, default=1e8, help="RegTop-k Q (default: %(default)g)")
    p.add_argument("--rounds", type=positive_int, default=2500,
                   help="communication rounds T (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=0.01, help="learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data and init seed (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma list of dense,topk,regtopk (default: all)")
    p.add_argument("--out", required=True, help=f"directory for {NAME}.json and {NAME}.png")
    p.add_argument("--debug", action="store_true", help="debug logging")
    return p


def worker_problem(seed: int, worker: int, dim: int, samples: int, mean: float,
                   noise_var: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """Worker ``worker``'s (A, y): float64, from its own generator (independent of the rank layout)."""
    rng = np.random.default_rng([seed, 1, worker])
    x_k = mean * np.ones(dim) + rng.standard_normal(dim)
    a = rng.standard_normal((samples, dim))
    y = a @ x_k + math.sqrt(noise_var) * rng.standard_normal(samples)
    return a, y


def worker_means(seed: int, workers: int, power: float = 5.0) -> np.ndarray:
    """m_k ~ sqrt(power) * N(0, 1) for every worker (the same on every rank)."""
    return math.sqrt(power) * np.random.default_rng([seed, 0]).standard_normal(workers)


def initial_model(seed: int, dim: int) -> np.ndarray:
    """Uniform(-1/sqrt(d), 1/sqrt(d)) as a torch Linear layer starts (seeded)."""
    bound = 1.0 / math.sqrt(dim)
    return np.random.default_rng([seed, 2]).uniform(-bound, bound, dim)


class LocalProblems:
    """This rank's workers as Gram matrices: grad_k(w) = (2/S) (A_k^T A_k w - A_k^T y_k)."""

    def __init__(self, seed: int, workers: Sequence[int], num_workers: int, dim: int, samples: int) -> None:
        means = worker_means(seed, num_workers)
        self.workers = list(workers)
        grams, rhs = [], []
        for k in self.workers:
            a, y = worker_problem(seed, k, dim, samples, float(means[k]))
            grams.append(a.T @ a)
            rhs.append(a.T @ y)
        self.gram = torch.from_numpy(np.array(grams, dtype=np.float64).reshape(len(grams), dim, dim))
        self.rhs = torch.from_numpy(np.array(rhs, dtype=np.float64).reshape(len(rhs), dim))
        self.scale = 2.0 / samples

    def grads(self, w: torch.Tensor) -> List[torch.Tensor]:
        """Each local worker's full-batch gradient of its mean squared error at ``w``."""
        g = (torch.matmul(self.gram, w) - self.rhs) * self.scale
        return list(g.unbind(0))


def optimum(problems: LocalProblems, comm: Any) -> np.ndarray:
    """The pooled least-squares solution x* = (sum_k A_k^T A_k)^-1 sum_k A_k^T y_k (one all-reduce)."""
    dim = problems.rhs.shape[1]
    local = np.concatenate([problems.gram.sum(0).numpy().reshape(-1), problems.rhs.sum(0).numpy()])
    total = np.empty_like(local)
    comm.Allreduce(local, total)
    return np.linalg.solve(total[:dim * dim].reshape(dim, dim), total[dim * dim:])


def run_method(method: str, problems: LocalProblems, x_star: np.ndarray, w0: np.ndarray,
               args: argparse.Namespace, communicator: Communicator) -> Dict[str, Any]:
    """T rounds of compressed distributed gradient descent; log10 ||w - x*||^2 after each round."""
    dim = len(w0)
    params = {} if method == "dense" else {"density": args.density, "mu": args.mu, "q": args.q}
    ex = VirtualWorkers(_COMPRESS[method], dim, args.workers, communicator,
                        local_workers=len(problems.workers), dtype=torch.float64, **params)
    w = torch.from_numpy(w0.copy())
    xs = torch.from_numpy(x_star)
    errs = np.empty(args.rounds)
    t0 = time.perf_counter()
    for t in range(args.rounds):
        mean = ex.exchange_many(problems.grads(w))
        w -= args.lr * mean
        errs[t] = float(torch.sum((w - xs) ** 2))
    elapsed = time.perf_counter() - t0
    with np.errstate(divide="ignore"):
        log_err = np.log10(np.maximum(errs, 1e-300))
    if not np.all(np.isfinite(errs)):
        log.warning("%s diverged (non-finite error)", method)
    return {"log10_err": log_err, "bytes_sent": ex.bytes_sent, "seconds": elapsed,
            "k": ex.k if problems.workers else None}


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, curve in result["log10_err"].items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=method)
    c = result["config"]
    ax.set_xlabel("round")
    ax.set_ylabel(r"$\log_{10}\|w - x^*\|^2$")
    ax.set_title(f"linear regression, N={c['workers']}, d={c['dim']}, k/d={c['density']}, mu={c['mu']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fileio.save_figure(fig, path, dpi=120)
    plt.close(fig)


def _finite(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--methods: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(METHODS)}")
    if args.density > 1:
        raise UserError(f"--density must be in (0, 1], got {args.density}")
    comm = _world()
    if args.workers < comm.size:
        raise UserError(f"--workers {args.workers} < {comm.size} ranks: every rank needs at least one worker")
    mine = worker_range(args.workers, comm.rank, comm.size)
    problems = LocalProblems(args.seed, mine, args.workers, args.dim, args.samples)
    x_star = optimum(problems, comm)
    w0 = initial_model(args.seed, args.dim)
    communicator = MPICommunicator(comm)
    curves, finals, info = {}, {}, {}
    for method in methods:
        r = run_method(method, problems, x_star, w0, args, communicator)
        total_bytes = comm.allreduce(r["bytes_sent"])
        seconds = comm.allreduce(r["seconds"], op=_max())
        curves[method] = [_finite(v) for v in r["log10_err"]]
        finals[method] = _finite(r["log10_err"][-1])
        info[method] = {"bytes_sent_all_ranks": int(total_bytes), "seconds": seconds,
                        "k_per_worker": r["k"] if method != "dense" else args.dim}
        if comm.rank == 0:
            log.info("%-8s final log10 err %.3f  (%.1f s)", method, r["log10_err"][-1], seconds)
    if comm.rank != 0:
        return 0
    result = {
        "benchmark": NAME,
        "config": {"workers": args.workers, "ranks": comm.size,
                   "virtual_workers_per_rank": args.workers / comm.size, "dim": args.dim,
                   "samples": args.samples, "density": args.density, "mu": args.mu, "q": args.q,
                   "rounds": args.rounds, "lr": args.lr, "seed": args.seed, "dtype": "float64"},
        "metric": "log10 ||w_t - x*||^2 after round t (t = 1..rounds, every round)",
        "initial_log10_err": float(np.log10(np.sum((w0 - x_star) ** 2))),
        "final_log10_err": finals,
        "methods": info,
        "log10_err": curves,
    }
    os.makedirs(args.out, exist_ok=True)
    fileio.write_json(os.path.join(args.out, f"{NAME}.json"), result)
    plot(result, os.path.join(args.out, f"{NAME}.png"))
    print(f"{NAME}: N={args.workers} on {comm.size} rank(s), d={args.dim}, k/d={args.density}, mu={args.mu}, "
          f"T={args.rounds}, lr={args.lr}")
    print(f"{'method':<9} {'final log10 err':>16} {'at T/2':>9} {'wire bytes/round':>17} {'seconds':>8}")
    for m in methods:
        half = curves[m][len(curves[m]) // 2 - 1]
        per = info[m]["bytes_sent_all_ranks"] / args.rounds
        print(f"{m:<9} {finals[m] if finals[m] is not None else float('nan'):>16.3f} "
              f"{half if half is not None else float('nan'):>9.3f} {per:>17.0f} {info[m]['seconds']:>8.1f}")
    print(f"wrote {os.path.join(args.out, NAME + '.json')} and .png")
    return 0


def _world() -> Any:
    """The world communicator (MPI initialised here, on first use)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _max() -> Any:
    from mpi4py import MPI

    return MPI.MAX


if __name__ == "__main__":
    run_main(main)
