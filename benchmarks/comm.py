"""Communication layer vs raw mpi4py: all-reduce, gossip step, sparse all-gather (run under mpirun).

``mpirun -n N python -m benchmarks comm [--quick] --out DIR`` writes ``DIR/comm.json`` and
``DIR/comm.png`` and prints a table. Every number is a ratio against a baseline measured in the
same run, variants interleaved round-robin so that machine noise hits them alike:

* ``allreduce_ratio`` = library ``allreduce_`` throughput / the best raw baseline on the same buffer
  (mpi4py ``Allreduce`` out-of-place and with ``MPI.IN_PLACE``; Horovod's ``allreduce_`` where it
  imports). Goal >= 0.95. A timed sample holds several calls below 250 000 elements (about 1 MB
  per sample; ``calls_per_sample``), times are per call.
* ``gossip_ratio`` = one gossip step on gossip's default, copy-free path (the message written into
  the engine's ``message_buffer``, then ``push`` + ``poll`` on a ring, as DASGD and compressed
  gossip do) / one raw ``Isend`` + ``Irecv`` + ``Waitall`` neighbour exchange of the same tensor,
  at 1e5 floats and at every larger ``--sizes`` entry; ``gossip_copy_ratio`` the same when a
  caller's tensor is pushed (the engine takes a snapshot copy); ``dasgd_ratio`` the communication part of
  one DASGD step as users and the trainer run it (:meth:`DASGD.push` + :meth:`DASGD.merge_arrived`:
  write the push-sum share, start the sends, absorb what arrived, set the model to ``z / w``), on a
  model of one parameter tensor of that size. Goal <= 1.1.
* ``goals``: each goal above, its worst value over the sizes, met or missed.
* sparse all-gather at densities 0.1 %, 1 %, 10 %: ``sparse_bytes_ratio`` = this rank's message
  bytes / dense bytes, ``sparse_time_ratio`` = time / dense all-reduce time.

Times are the best (minimum) over repetitions of the slowest rank's time: on a shared machine the
minimum is the least disturbed estimate of each variant's own cost. The clock is the process's CPU
time (``--clock cpu``, the default: every thread of the process, so Horovod's background thread
counts; time spent waiting in MPI counts too, since MPI polls) — unlike wall-clock time
(``--clock wall``) it does not grow while another job on the machine has the core. The sparse time includes
summing the gathered pieces into a dense tensor (``to_dense``), i.e. the same result as the dense
all-reduce.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from benchmarks.checkout import horovod_available
from hpc_dgrab import fileio, runtime
from hpc_dgrab.cli import ArgumentParser, UserError, positive_int, run_main

log = logging.getLogger(__name__)

SIZES = [10_000, 100_000, 1_000_000, 10_000_000]
DENSITIES = [0.001, 0.01, 0.1]


_REPS_OVERRIDE: Optional[int] = None
CLOCKS: Dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
_clock: Callable[[], float] = time.process_time


def _reps(numel: int, quick: bool) -> int:
    if _REPS_OVERRIDE is not None:
        return _REPS_OVERRIDE
    full = {10_000: 200, 100_000: 60, 1_000_000: 20, 10_000_000: 6}
    fast = {10_000: 40, 100_000: 20, 1_000_000: 6, 10_000_000: 3}
    table = fast if quick else full
    return table.get(numel, max(3, table[min(table, key=lambda s: abs(s - numel))]))


def _timed(comm: Any, fn: Callable[[], Any]) -> float:
    """Slowest rank's time of one call, all ranks starting together."""
    from mpi4py import MPI

    comm.Barrier()
    clock = _clock
    t0 = clock()
    fn()
    dt = clock() - t0
    return comm.allreduce(dt, op=MPI.MAX)


def _round_robin(comm: Any, variants: Dict[str, Callable[[], Any]], reps: int,
                 warmup: int = 1) -> Dict[str, float]:
    """Best time of each variant, interleaved rep by rep in a random (rank-agreed) order."""
    times: Dict[str, List[float]] = {k: [] for k in variants}
    names = list(variants)
    rng = np.random.default_rng(len(names) * 1000 + reps)   # same order on every rank
    for rep in range(warmup + reps):
        for name in rng.permutation(names):   # no variant always runs first or after the same one
            dt = _timed(comm, variants[name])
            if rep >= warmup:
                times[name].append(dt)
    return {k: min(v) for k, v in times.items()}


def _calls_per_sample(numel: int) -> int:
    """All-reduces per timed sample: about 1 MB moved, so that a small call is not lost in the
    barrier's exit skew and the clock's grain (one call of 1e4 floats takes tens of microseconds)."""
    return max(1, 250_000 // numel)


def _repeat(fn: Callable[[], Any], k: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(k):
            fn()
    return run


def _per_call(res: Dict[str, float], k: int) -> Dict[str, float]:
    return {name: t / k for name, t in res.items()}


def bench_allreduce(comm: Any, sizes: Sequence[int], quick: bool) -> List[Dict[str, Any]]:
    """Library allreduce_ vs raw mpi4py (in place, out of place), interleaved, Horovod not running."""
    from mpi4py import MPI

    from hpc_dgrab.comm import get_transport

    backend = get_transport("mpi", comm, progress="inline")   # a blocking sum needs no thread
    rows = []
    for numel in sizes:
        t = torch.ones(numel, dtype=torch.float32)
        a = t.numpy()
        out = np.empty_like(a)
        k = _calls_per_sample(numel)
        variants: Dict[str, Callable[[], Any]] = {
            "library": _repeat(lambda t=t: backend.allreduce_(t), k),
            "raw_in_place": _repeat(lambda a=a: comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM), k),
            "raw_out_of_place": _repeat(lambda a=a, out=out: comm.Allreduce(a, out, op=MPI.SUM), k),
        }
        res = _per_call(_round_robin(comm, variants, _reps(numel, quick)), k)
        row = {"numel": numel, "bytes": numel * 4, "calls_per_sample": k}
        row.update({f"{k}_s": v for k, v in res.items()})
        rows.append(row)
    backend.close()
    return rows


def bench_horovod(comm: Any, rows: List[Dict[str, Any]], quick: bool, hvd_backend: Any) -> None:
    """Add Horovod's own allreduce_ and the library's horovod backend to ``rows`` (measured after
    the MPI variants, since Horovod's background thread runs from hvd.init on), plus mpi4py
    in-place again as this phase's reference."""
    from mpi4py import MPI

    hvd = hvd_backend.hvd
    for row in rows:
        t = torch.ones(row["numel"], dtype=torch.float32)
        a = t.numpy()
        k = _calls_per_sample(row["numel"])
        res = _per_call(_round_robin(comm, {
            "horovod": _repeat(lambda t=t: hvd.allreduce_(t, op=hvd.Sum), k),
            "library_horovod": _repeat(lambda t=t: hvd_backend.allreduce_(t), k),
            "raw_in_place_hvd_running": _repeat(lambda a=a: comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM), k),
        }, _reps(row["numel"], quick)), k)
        row.update({f"{k}_s": v for k, v in res.items()})


def _horovod(comm: Any, disabled: bool) -> tuple[Optional[Any], Optional[str]]:
    """(Horovod transport, None) or (None, why it is skipped)."""
    from hpc_dgrab.comm import get_transport

    if disabled:
        return None, "--no-horovod"
    if not horovod_available():
        return None, "horovod.torch does not import (make horovod)"
    return get_transport("horovod", comm), None


def _finish_allreduce(rows: List[Dict[str, Any]]) -> None:
    for row in rows:
        baselines = {k: row[k] for k in ("raw_in_place_s", "raw_out_of_place_s", "horovod_s") if k in row}
        best = min(baselines, key=baselines.get)
        row["best_baseline"] = best[:-2]
        row["allreduce_ratio"] = baselines[best] / row["library_s"]      # throughput ratio
        row["library_GBps"] = row["bytes"] / row["library_s"] / 1e9


def bench_gossip(comm: Any, numel: int, steps: int) -> Dict[str, Any]:
    """Per-step time of push + poll on a ring vs a raw Isend/Irecv/Waitall exchange.

    Two gossip variants on one long-lived engine each (created and closed outside the timing):
    ``gossip`` (the default path) writes nothing and pushes the engine's :meth:`message_buffer`
    (the message is produced where it is sent, like the raw exchange's static send buffer);
    ``gossip_copy`` pushes a caller's tensor (the engine takes a snapshot copy); ``dasgd`` is
    :meth:`DASGD.push` + :meth:`DASGD.merge_arrived` (the step's communication part, its compute
    left out) on a one-tensor model.
    """
    from mpi4py import MPI

    from hpc_dgrab.comm.gossip import GossipEngine
    from hpc_dgrab.comm.topology import Topology
    from hpc_dgrab.optim.dasgd import DASGD

    topo = Topology.from_name("ring", comm.size)
    peers = topo.out_neighbors(comm.rank)
    x = torch.ones(numel, dtype=torch.float32)
    send = x.numpy()
    recv = [np.empty_like(send) for _ in peers]

    def raw() -> None:
        for _ in range(steps):
            reqs = [comm.Irecv(recv[i], source=p, tag=11) for i, p in enumerate(peers)]
            reqs += [comm.Isend(send, dest=p, tag=11) for p in peers]
            MPI.Request.Waitall(reqs)

    engines = {k: GossipEngine(topo, numel, dtype=torch.float32, comm=comm, max_in_flight=2)
               for k in ("copy", "in_place")}
    clock = {"copy": 0, "in_place": 0}

    def gossip(kind: str) -> Callable[[], None]:
        eng = engines[kind]

        def run() -> None:
            for _ in range(steps):
                clock[kind] += 1
                msg = x if kind == "copy" else eng.message_buffer()
                eng.push(msg, 1.0, version=clock[kind])
                eng.poll()
        return run

    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.ones(numel, dtype=torch.float32))
    dasgd = DASGD(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.nn.functional.mse_loss,
                  GossipEngine(topo, numel, dtype=torch.float32, comm=comm, max_in_flight=2))

    def dasgd_comm() -> None:
        for _ in range(steps):
            dasgd.steps += 1          # the clock compute() advances
            dasgd.push()
            dasgd.merge_arrived()

    res = _round_robin(comm, {"raw": raw, "gossip": gossip("in_place"), "gossip_copy": gossip("copy"),
                              "dasgd": dasgd_comm}, reps=5, warmup=1)
    stats = {}
    for kind, eng in engines.items():
        eng.close()
        stats[kind] = eng.stats()
    dasgd_stats = dasgd.finish()
    return {"numel": numel, "steps": steps, "ring_degree": len(peers),
            "gossip_step_s": res["gossip"] / steps, "gossip_copy_step_s": res["gossip_copy"] / steps,
            "raw_exchange_s": res["raw"] / steps,
            "gossip_ratio": res["gossip"] / res["raw"],
            "gossip_copy_ratio": res["gossip_copy"] / res["raw"],
            "dasgd_comm_step_s": res["dasgd"] / steps, "dasgd_ratio": res["dasgd"] / res["raw"],
            # messages per step (the raw exchange sends one per neighbour every step): a push that
            # finds its links busy sends nothing (gossip: merged into pending; DASGD: kept home)
            "gossip_sent_per_step": stats["in_place"]["messages_sent"] / max(1, stats["in_place"]["pushes"]),
            "dasgd_sent_per_step": dasgd_stats["messages_sent"] / max(1, dasgd_stats["pushes"]
                                                                      + dasgd_stats["skipped_pushes"]),
            "messages_sent": stats["in_place"].get("messages_sent"),
            "replacements": stats["in_place"].get("replacements"),
            "staleness_avg": stats["in_place"].get("staleness_avg")}


def bench_sparse(comm: Any, numel: int, quick: bool) -> List[Dict[str, Any]]:
    from hpc_dgrab.comm import get_transport
    from hpc_dgrab.comm.sparse import sparse_allgather

    backend = get_transport("mpi", comm, progress="inline")
    dense = torch.ones(numel, dtype=torch.float32)
    gen = torch.Generator().manual_seed(comm.rank)
    rows = []
    for density in DENSITIES:
        k = max(1, int(round(density * numel)))
        idx = torch.randperm(numel, generator=gen)[:k]
        val = torch.randn(k, generator=gen)
        info: Dict[str, Any] = {}

        def sparse(idx: torch.Tensor = idx, val: torch.Tensor = val, info: Dict[str, Any] = info) -> None:
            g = sparse_allgather(idx, val, numel=numel, same_sizes=True, transport=backend)
            info["message_bytes"] = g.message_bytes
            info["dense"] = g.to_dense(numel)

        res = _round_robin(comm, {"sparse": sparse, "dense": lambda: backend.allreduce_(dense)},
                           _reps(numel, quick))
        dense_bytes = numel * 4
        n = comm.size
        rows.append({"density": density, "numel": numel, "k": k, "message_bytes": info["message_bytes"],
                     "dense_bytes": dense_bytes,
                     "sparse_bytes_ratio": info["message_bytes"] / dense_bytes,
                     # what one rank receives vs what a ring all-reduce moves per rank (2 (n-1)/n)
                     "sparse_wire_ratio": ((n - 1) * info["message_bytes"]) / (2 * (n - 1) / n * dense_bytes)
                     if n > 1 else 0.0,
                     "sparse_s": res["sparse"], "dense_allreduce_s": res["dense"],
                     "sparse_time_ratio": res["sparse"] / res["dense"]})
    backend.close()
    return rows


def _plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    rows = result["allreduce"]
    sizes = [r["numel"] for r in rows]
    for key, label in [("library_s", "hpc_dgrab allreduce_"), ("raw_in_place_s", "mpi4py IN_PLACE"),
                       ("raw_out_of_place_s", "mpi4py out-of-place"), ("horovod_s", "horovod allreduce_")]:
        if all(key in r for r in rows):
            ax.loglog(sizes, [r["bytes"] / r[key] / 1e9 for r in rows], marker="o", label=label)
    ax.set_xlabel("float32 elements")
    ax.set_ylabel("GB/s (buffer bytes / time)")
    ax.set_title(f"all-reduce, {result['ranks']} ranks")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.semilogx(sizes, [r["allreduce_ratio"] for r in rows], marker="o", label="allreduce_ratio")
    ax.axhline(0.95, color="grey", ls="--", lw=1, label="goal 0.95")
    g = result["gossip"]
    ax.axhline(g["gossip_ratio"], color="C3", lw=1.5, label=f"gossip_ratio {g['gossip_ratio']:.2f} "
               f"({g['numel']:.0e} el.)")
    ax.set_xlabel("float32 elements")
    ax.set_ylabel("ratio")
    ax.set_title("library vs best raw baseline (same run)")
    ax.legend(fontsize=8)
    ax = axes[2]
    sp = result["sparse"]
    pos = np.arange(len(sp))
    ax.bar(pos - 0.2, [r["sparse_bytes_ratio"] for r in sp], 0.4, label="bytes / dense bytes")
    ax.bar(pos + 0.2, [r["sparse_time_ratio"] for r in sp], 0.4, label="time / dense all-reduce")
    ax.set_xticks(pos, [f"{100 * r['density']:g} %" for r in sp])
    ax.set_yscale("log")
    ax.set_title(f"sparse all-gather, {sp[0]['numel']:.0e} elements")
    ax.legend(fontsize=8)
    fig.suptitle("hpc_dgrab comm benchmark (ratios within one run; shared machine)", fontsize=10)
    fig.tight_layout()
    fileio.save_figure(fig, path, dpi=110)
    plt.close(fig)


def _table(result: Dict[str, Any]) -> str:
    lines = [f"comm benchmark: {result['ranks']} ranks (times = best rep of the slowest rank, "
             f"{result.get('clock', 'cpu')} clock)",
             f"{'elements':>10} {'library':>10} {'in-place':>10} {'out-place':>10} {'horovod':>10} "
             f"{'best':>16} {'ratio':>6}"]
    for r in result["allreduce"]:
        hv = f"{r['horovod_s'] * 1e3:9.3f}m" if "horovod_s" in r else f"{'-':>10}"
        lines.append(f"{r['numel']:>10} {r['library_s'] * 1e3:9.3f}m {r['raw_in_place_s'] * 1e3:9.3f}m "
                     f"{r['raw_out_of_place_s'] * 1e3:9.3f}m {hv} {r['best_baseline']:>16} "
                     f"{r['allreduce_ratio']:6.2f}")
    for g in result["gossip_sizes"]:
        lines.append(f"gossip step ({g['numel']} el., ring): {g['gossip_step_s'] * 1e6:.1f} us (copy "
                     f"{g['gossip_copy_step_s'] * 1e6:.1f} us) vs raw exchange "
                     f"{g['raw_exchange_s'] * 1e6:.1f} us -> gossip_ratio {g['gossip_ratio']:.2f} "
                     f"(copy {g['gossip_copy_ratio']:.2f}); DASGD push+merge "
                     f"{g['dasgd_comm_step_s'] * 1e6:.1f} us -> dasgd_ratio {g['dasgd_ratio']:.2f}; "
                     f"messages per step {g['gossip_sent_per_step']:.2f} / DASGD "
                     f"{g['dasgd_sent_per_step']:.2f} (raw {g['ring_degree']})")
    lines.append(f"{'density':>8} {'k':>8} {'bytes ratio':>12} {'wire ratio':>11} {'time ratio':>11}")
    for r in result["sparse"]:
        lines.append(f"{100 * r['density']:7g}% {r['k']:>8} {r['sparse_bytes_ratio']:12.4f} "
                     f"{r['sparse_wire_ratio']:11.4f} {r['sparse_time_ratio']:11.3f}")
    if result.get("horovod_skipped"):
        lines.append(f"horovod: skipped ({result['horovod_skipped']})")
    for name, goal in result["goals"].items():
        verdict = "met" if goal["met"] else "MISSED"
        lines.append(f"goal {name}: {goal['value']:.3f} ({goal['rule']}) -> {verdict}")
    return "\n".join(lines)


GOAL_GOSSIP = 1.1
GOAL_ALLREDUCE = 0.95


def goals(result: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Each goal of the communication layer, met or missed (worst case over the measured sizes)."""
    out: Dict[str, Dict[str, Any]] = {}
    ar = min(r["allreduce_ratio"] for r in result["allreduce"])
    out["allreduce_throughput_vs_best_raw"] = {"value": ar, "rule": f">= {GOAL_ALLREDUCE} at every size",
                                               "met": ar >= GOAL_ALLREDUCE}
    for key, label in (("gossip_ratio", "gossip_step_vs_raw_exchange"),
                       ("gossip_copy_ratio", "gossip_step_copy_vs_raw_exchange"),
                       ("dasgd_ratio", "dasgd_push_merge_vs_raw_exchange")):
        if not all(key in g for g in result["gossip_sizes"]):
            continue          # a result written before this ratio was measured
        worst = max(g[key] for g in result["gossip_sizes"])
        out[label] = {"value": worst, "rule": f"<= {GOAL_GOSSIP} at every size "
                      f"({', '.join(str(g['numel']) for g in result['gossip_sizes'])} floats)",
                      "met": worst <= GOAL_GOSSIP}
    return out


def _sizes(text: str) -> List[int]:
    try:
        sizes = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated element counts, got {text!r}") from None
    if not sizes or min(sizes) < 1000:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1000 elements, got {text!r}")
    return sizes


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks comm", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for comm.json and comm.png")
    parser.add_argument("--quick", action="store_true", help="few repetitions (under a minute on 4 ranks)")
    parser.add_argument("--no-horovod", action="store_true", help="skip the Horovod baseline")
    parser.add_argument("--sizes", type=_sizes, default=SIZES,
                        help="comma-separated all-reduce sizes in elements (default 1e4,1e5,1e6,1e7); "
                             "gossip uses min(1e5, largest), sparse min(1e6, largest)")
    parser.add_argument("--reps", type=positive_int, default=None,
                        help="repetitions per variant (default: by size; fewer with --quick)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: the process's CPU time (default; robust on a shared machine); "
                             "wall: wall-clock")
    args = parser.parse_args(argv)
    global _REPS_OVERRIDE, _clock
    _REPS_OVERRIDE = args.reps
    _clock = CLOCKS[args.clock]
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} exists and is not a directory")

    rt = runtime.get_runtime()
    comm = runtime.world()
    start = time.perf_counter()
    result: Dict[str, Any] = {"ranks": comm.size, "nodes": rt.num_nodes, "quick": bool(args.quick),
                              "clock": args.clock,
                              "note": "ratios within one run; absolute times from a busy shared machine",
                              "torch_threads": torch.get_num_threads()}
    largest = max(args.sizes)
    steps = 10 * args.reps if args.reps else 100 if args.quick else 500
    gsizes = sorted({min(100_000, largest)} | {n for n in args.sizes if n > 100_000})
    result["gossip_sizes"] = [bench_gossip(comm, n, steps=max(4, steps * min(100_000, largest) // n))
                              for n in gsizes]
    result["gossip"] = result["gossip_sizes"][0]
    result["sparse"] = bench_sparse(comm, min(1_000_000, largest), args.quick)
    rows = bench_allreduce(comm, args.sizes, args.quick)
    hvd_backend, skipped = _horovod(comm, args.no_horovod)   # started only now (background thread)
    if hvd_backend is not None:
        bench_horovod(comm, rows, args.quick, hvd_backend)
    _finish_allreduce(rows)
    result["allreduce"] = rows
    result["horovod_skipped"] = skipped
    result["summary"] = {
        "allreduce_ratio_min": min(r["allreduce_ratio"] for r in rows),
        "allreduce_ratio_by_numel": {str(r["numel"]): round(r["allreduce_ratio"], 3) for r in rows},
        "gossip_ratio": result["gossip"]["gossip_ratio"],
        "gossip_ratio_by_numel": {str(g["numel"]): round(g["gossip_ratio"], 3)
                                  for g in result["gossip_sizes"]},
        "gossip_copy_ratio_by_numel": {str(g["numel"]): round(g["gossip_copy_ratio"], 3)
                                           for g in result["gossip_sizes"]},
        "dasgd_ratio_by_numel": {str(g["numel"]): round(g["dasgd_ratio"], 3) for g in result["gossip_sizes"]},
        "sparse_bytes_ratio": {f"{r['density']:g}": r["sparse_bytes_ratio"] for r in result["sparse"]},
        "sparse_time_ratio": {f"{r['density']:g}": round(r["sparse_time_ratio"], 3)
                              for r in result["sparse"]},
    }
    result["goals"] = goals(result)
    result["elapsed_s"] = round(time.perf_counter() - start, 2)
    if comm.rank == 0:
        fileio.write_json(os.path.join(args.out, "comm.json"), result)
        _plot(result, os.path.join(args.out, "comm.png"))
        sys.stdout.write(_table(result) + "\n")
        sys.stdout.write(f"wrote {os.path.join(args.out, 'comm.json')} and comm.png "
                         f"({result['elapsed_s']} s)\n")
    if hvd_backend is not None:
        hvd_backend.hvd.shutdown()
    return 0


if __name__ == "__main__":
    run_main(main)
