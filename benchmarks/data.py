"""Shard reader throughput (examples/s) versus a numpy .npy memmap of the same arrays.

One shard of an image data set (Fashion-MNIST by default: 60,000 training images cut into 4
shards, so one shard holds 15,000 28x28 uint8 images) is read in batches of 64, in random order
and sequentially, through :class:`hpc_dgrab.data.reader.ShardDataset` (``get_batch``) and from
``np.load(..., mmap_mode="r")`` of the same arrays written as ``.npy``. Both produce the same
output, float32 inputs in [0, 1] and int64 labels as torch tensors. Modes of the reader:

* ``cached``: the default (a shard below ``cache_bytes`` is read once and kept in memory);
* ``streaming``: ``cache_bytes=0`` with the default chunk cache (decompressed chunks kept);
* ``streaming-1MiB``: ``cache_bytes=0`` and a 1 MiB chunk cache (data much bigger than memory).

A pass repeats one epoch of the same batches for at least ``--min-time`` seconds (cut after
``--budget`` seconds); the readers take turns pass by pass, ``--repeats`` times, and the best pass
of each counts. Ratios are against the memmap baseline measured in the same run.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from hpc_dgrab.cli import ArgumentParser, UserError, positive_float, positive_int, run_main, setup_logging
from hpc_dgrab.data.reader import ShardDataset, to_float32
from hpc_dgrab.data.shards import COMPRESSIONS, ShardError, make_shards
from hpc_dgrab.data.sources import SourceError
from hpc_dgrab.fileio import save_figure, write_json

log = logging.getLogger(__name__)

Reader = Callable[[np.ndarray], Tuple[torch.Tensor, torch.Tensor]]


def memmap_reader(x_path: str, y_path: str) -> Reader:
    """get_batch over ``.npy`` memmaps, with the same output (and float conversion) as the shard reader."""
    # plain ndarray views of the mappings: indexing an np.memmap subclass adds Python overhead
    xm = np.load(x_path, mmap_mode="r").view(np.ndarray)
    ym = np.load(y_path, mmap_mode="r").view(np.ndarray)
    scale = 1.0 / 255.0 if xm.dtype == np.uint8 else 1.0

    def get_batch(idx: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(to_float32(xm[idx], scale)), torch.from_numpy(np.asarray(ym[idx]))

    return get_batch


def batches(n: int, batch: int, order: str, seed: int) -> List[np.ndarray]:
    """One epoch of index batches: a seeded permutation, or 0..n-1 in order."""
    idx = np.random.default_rng(seed).permutation(n) if order == "random" else np.arange(n)
    return [idx[i:i + batch] for i in range(0, n, batch)]


def one_pass(get_batch: Reader, plan: Sequence[np.ndarray], min_time: float,
             budget: float) -> Tuple[float, int]:
    """Examples/s of one pass: ``plan`` repeated for at least ``min_time`` s, cut after ``budget`` s."""
    count, start = 0, time.perf_counter()
    while True:
        for idx in plan:
            x, _ = get_batch(idx)
            count += x.shape[0]
            if time.perf_counter() - start > budget:
                return count / (time.perf_counter() - start), count
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return count / elapsed, count


def throughput(readers: Dict[str, Reader], plan: Sequence[np.ndarray], repeats: int, min_time: float,
               budget: float) -> Dict[str, Dict[str, float]]:
    """Best examples/s of every reader over ``repeats`` passes, the readers interleaved."""
    best: Dict[str, Dict[str, float]] = {name: {"examples_per_s": 0.0} for name in readers}
    for _ in range(repeats):
        for name, reader in readers.items():
            rate, count = one_pass(reader, plan, min_time, budget)
            if rate > best[name]["examples_per_s"]:
                best[name] = {"examples_per_s": rate, "examples_per_pass": count}
    return best


def build_parser() -> ArgumentParser:
    """Options of ``python -m benchmarks data``."""
    p = ArgumentParser(prog="python -m benchmarks data", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/data.json and DIR/data.png")
    p.add_argument("--source", default="fashion-mnist", help="data set (default fashion-mnist)")
    p.add_argument("--shards", type=positive_int, default=4,
                   help="shards to cut; shard 0 is read (default 4)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="examples per read (default 64)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                   help="HDF5 compression of the shards (default gzip)")
    p.add_argument("--repeats", type=positive_int, default=5, help="passes per reader, best kept (default 5)")
    p.add_argument("--min-time", type=positive_float, default=0.25,
                   help="a pass repeats the epoch for at least this many seconds (default 0.25)")
    p.add_argument("--budget", type=positive_float, default=1.0,
                   help="seconds per pass at most (default 1.0)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the shard split and the read order (default 0)")
    p.add_argument("--debug", action="store_true", help="debug logging")
    return p


def run(args) -> dict:  # noqa: ANN001 - argparse namespace
    """Measure every mode; the result dictionary written to data.json."""
    with tempfile.TemporaryDirectory(prefix="hpc_dgrab-bench-data-") as tmp:
        t0 = time.perf_counter()
        manifest = make_shards(args.source, os.path.join(tmp, "shards"), args.shards, "iid", args.seed,
                               compression=args.compression)
        write_s = time.perf_counter() - t0
        root = os.path.join(tmp, "shards")
        first = ShardDataset(root, 0, args.shards, cache_bytes=0)
        x_all, y_all = first.read_x(np.arange(len(first))), first.y
        first.close()
        np.save(os.path.join(tmp, "x.npy"), x_all)
        np.save(os.path.join(tmp, "y.npy"), y_all)
        n = len(y_all)
        readers: Dict[str, Reader] = {
            "memmap": memmap_reader(os.path.join(tmp, "x.npy"), os.path.join(tmp, "y.npy"))}
        t0 = time.perf_counter()
        cached = ShardDataset(root, 0, args.shards)
        cached.get_batch(np.arange(1))
        load_s = time.perf_counter() - t0
        assert cached.cached
        readers["cached"] = cached.get_batch
        readers["streaming"] = ShardDataset(root, 0, args.shards, cache_bytes=0).get_batch
        readers["streaming-1MiB"] = ShardDataset(root, 0, args.shards, cache_bytes=0,
                                                 chunk_cache_bytes=1 << 20).get_batch
        # The same inputs from every reader (checked once, outside the timing).
        probe = np.random.default_rng(1).integers(0, n, 64)
        ref = readers["memmap"](probe)
        for name, reader in readers.items():
            got = reader(probe)
            if not (torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])):
                raise RuntimeError(f"reader {name} returns different data than the memmap")
        results: Dict[str, Dict[str, Dict[str, float]]] = {}
        for order in ("random", "sequential"):
            plan = batches(n, args.batch_size, order, args.seed)
            rates = throughput(readers, plan, args.repeats, args.min_time, args.budget)
            for name in readers:
                results.setdefault(name, {})[order] = rates[name]
        for name in results:
            for order in results[name]:
                base = results["memmap"][order]["examples_per_s"]
                results[name][order]["ratio_vs_memmap"] = results[name][order]["examples_per_s"] / base
    cached_ratios = [results["cached"][o]["ratio_vs_memmap"] for o in ("random", "sequential")]
    return {
        "benchmark": "data", "goal_met": bool(min(cached_ratios) >= 0.8),
        "source": manifest["source"], "shard_examples": n, "x_shape": manifest["x_shape"],
        "x_dtype": manifest["x_dtype"], "compression": args.compression,
        "chunk_examples": manifest["chunk_examples"], "batch_size": args.batch_size,
        "repeats": args.repeats, "min_time_s": args.min_time, "budget_s": args.budget,
        "write_shards_s": write_s, "cached_load_s": load_s, "goal_ratio": 0.8,
        "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count(),
        "note": "examples/s are noisy on a busy shared machine; compare the ratios, measured in the same run",
        "results": results,
    }


def table(result: dict) -> str:
    """A short text table of the result."""
    lines = [f"{result['source']}: one shard of {result['shard_examples']} examples "
             f"{result['x_dtype']} {tuple(result['x_shape'])}, {result['compression']}, "
             f"batch {result['batch_size']} "
             f"(load average {result['load_average'][0]:.1f} on {result['cpu_count']} cores)",
             f"{'reader':<16}{'random ex/s':>14}{'vs memmap':>11}{'sequential ex/s':>18}{'vs memmap':>11}"]
    for name, r in result["results"].items():
        rnd, seq = r["random"], r["sequential"]
        lines.append(f"{name:<16}{rnd['examples_per_s']:>14,.0f}{rnd['ratio_vs_memmap']:>10.2f}x"
                     f"{seq['examples_per_s']:>18,.0f}{seq['ratio_vs_memmap']:>10.2f}x")
    lines.append(f"goal: cached (default) reader >= {result['goal_ratio']}x memmap: "
                 f"{'met' if result['goal_met'] else 'NOT met'}; "
                 f"first read of the cached shard took {result['cached_load_s'] * 1e3:.0f} ms")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    """Bar chart of the ratios against the memmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["results"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.38
    for k, order in enumerate(("random", "sequential")):
        vals = [result["results"][n][order]["ratio_vs_memmap"] for n in names]
        ax.bar(np.arange(len(names)) + (k - 0.5) * width, vals, width, label=order)
    ax.axhline(result["goal_ratio"], color="k", lw=0.8, ls="--", label="goal 0.8x")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("examples/s relative to .npy memmap")
    ax.set_title(f"{result['source']} shard reader, batch {result['batch_size']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m benchmarks data``."""
    args = build_parser().parse_args(argv)
    setup_logging(args.debug, rank=0)
    torch.set_num_threads(1)
    try:
        result = run(args)
    except (ShardError, SourceError) as exc:
        raise UserError(str(exc)) from None
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "data.json"), result)
    plot(result, os.path.join(args.out, "data.png"))
    print(table(result), end="")
    print(f"wrote {os.path.join(args.out, 'data.json')} and data.png")
    return 0


if __name__ == "__main__":
    run_main(main)
