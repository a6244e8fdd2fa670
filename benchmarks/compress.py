"""Top-k / RegTop-k selection time versus torch.topk alone, and wire bytes versus dense."""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.virtual import LocalCommunicator, VirtualWorkers, density_label
from hpc_dgrab import fileio
from hpc_dgrab.cli import ArgumentParser, UserError, positive_int, run_main, setup_logging
from hpc_dgrab.compress import make_compressor

log = logging.getLogger(__name__)

NAME = "compress"

EPILOG = """\
Selection = one call of the compressor's compress(a, state) on a float32 vector of n entries:
|a| (and for RegTop-k the posterior weights at last round's k positions), torch.topk, the gather of
the values. RegTop-k is timed in a steady-state round (its state holds a previous round's k
positions). "+EF" adds the error feedback (a = g + e, e = a - v). The functions run back to back in
every repeat; times are medians, ratios the median of the per-repeat ratios to torch.topk(|a|, k)
(the machine may be busy: compare ratios, not seconds).
Wire bytes are counted by the exchange itself (one rank, extra = none): k int32 indices + k float32
values per rank and round, against n float32 values for a dense all-reduce.
"""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m benchmarks {NAME}", description=__doc__.splitlines()[0],
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1e5,1e6,1e7", help="vector lengths (default: %(default)s)")
    p.add_argument("--densities", default="0.001,0.01,0.1", help="fractions kept (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats at 1e7 entries; more for "
                   "smaller sizes (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (default: %(default)s, as one rank of an MPI job; more threads make "
                        "the timings on a shared machine much noisier)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random vectors (default: %(default)s)")
    p.add_argument("--out", required=True, help=f"directory for {NAME}.json")
    p.add_argument("--debug", action="store_true", help="debug logging")
    return p


def _floats(text: str, flag: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected a comma list of numbers, got {text!r}") from None
    if not values:
        raise UserError(f"{flag}: empty list")
    return values


def interleaved_times(fns: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, List[float]]:
    """Wall times of every ``fn`` over ``repeats`` rounds, the functions run back to back in each
    round (so they see the same machine load); one warm-up round first."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for rnd in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rnd:
                times[name].append(time.perf_counter() - t0)
    return times


def steady_state(method: str, n: int, density: float, gen: torch.Generator) -> Any:
    """A worker of ``method`` after one round (so RegTop-k's weights are in play)."""
    ex = VirtualWorkers(method, n, 4, LocalCommunicator(), density=density, mu=4.0)
    ex.exchange(torch.randn(n, generator=gen))
    return ex.workers[0]


def time_cell(n: int, density: float, repeats: int, gen: torch.Generator) -> Dict[str, Any]:
    """Median times and median per-round ratios to torch.topk for one (n, density)."""
    a = torch.randn(n, generator=gen)
    k = make_compressor("topk", density=density).k_for(n)
    workers = {m: steady_state(m, n, density, gen) for m in ("topk", "regtopk")}

    def select(w: Any) -> Callable[[], Any]:
        return lambda: w.compressor.compress(a, w.states[0])

    def step(w: Any) -> Callable[[], Any]:
        return lambda: w.compress(a)   # the timing never exchanges: no observe()

    fns: Dict[str, Callable[[], Any]] = {"torch_topk": lambda: torch.topk(a.abs(), k, sorted=False)}
    for m, w in workers.items():
        fns[f"{m}_select"] = select(w)
        fns[f"{m}_step"] = step(w)
    times = interleaved_times(fns, repeats)
    row: Dict[str, Any] = {"n": n, "density": density, "k": k, "repeats": repeats}
    base = times["torch_topk"]
    row["torch_topk_s"] = statistics.median(base)
    for name, ts in times.items():
        if name == "torch_topk":
            continue
        row[f"{name}_s"] = statistics.median(ts)
        row[f"{name}_ratio"] = statistics.median(t / b for t, b in zip(ts, base))
    return row


def wire_cell(n: int, density: float) -> Dict[str, Any]:
    """Bytes the exchanger reports for one round, sparse vs dense, float32, one rank."""
    g = torch.ones(n)
    sparse = VirtualWorkers("regtopk", n, 1, LocalCommunicator(), density=density)
    sparse.exchange(g)
    dense = VirtualWorkers("none", n, 1, LocalCommunicator())
    dense.exchange(g)
    return {"n": n, "density": density, "k": sparse.k, "wire_bytes": sparse.bytes_sent,
            "dense_bytes": dense.bytes_sent, "ratio": sparse.bytes_sent / dense.bytes_sent}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    sizes = [int(s) for s in _floats(args.sizes, "--sizes")]
    densities = _floats(args.densities, "--densities")
    if any(s < 1 for s in sizes) or any(not 0 < d <= 1 for d in densities):
        raise UserError("--sizes must be >= 1 and --densities in (0, 1]")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    timing, wire = [], []
    for n in sizes:
        repeats = max(args.repeats, min(50, args.repeats * (10 ** 7 // max(n, 1))))
        for d in densities:
            row = time_cell(n, d, repeats, gen)
            timing.append(row)
            log.debug("%s", row)
            wire.append(wire_cell(n, d))
    result = {"benchmark": NAME, "torch_threads": torch.get_num_threads(), "dtype": "float32",
              "note": "selection times on a busy shared machine; compare the ratios to torch.topk",
              "selection": timing, "wire": wire}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{NAME}.json")
    fileio.write_json(path, result)
    print(f"selection (median s; ratio = time / torch.topk alone), {torch.get_num_threads()} torch threads")
    print(f"{'n':>10} {'density':>8} {'torch.topk':>11} {'topk':>9} {'ratio':>6} {'regtopk':>9} {'ratio':>6}"
          f" {'topk+EF':>8} {'regtopk+EF':>10}")
    for r in timing:
        print(f"{r['n']:>10} {density_label(r['density']):>8} {r['torch_topk_s']:>11.5f} "
              f"{r['topk_select_s']:>9.5f} {r['topk_select_ratio']:>6.2f} {r['regtopk_select_s']:>9.5f} "
              f"{r['regtopk_select_ratio']:>6.2f} {r['topk_step_ratio']:>8.2f} "
              f"{r['regtopk_step_ratio']:>10.2f}")
    print("wire bytes per rank and round / dense bytes")
    print(f"{'n':>10} {'density':>8} {'k':>8} {'wire':>11} {'dense':>11} {'ratio':>7}")
    for r in wire:
        print(f"{r['n']:>10} {density_label(r['density']):>8} {r['k']:>8} {r['wire_bytes']:>11} "
              f"{r['dense_bytes']:>11} {r['ratio']:>7.4f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
