"""``python -m hpc_dgrab.train``: data-parallel training under mpirun or srun.

Every rank reads only its own shard of ``--data``, trains with the chosen synchronisation, and
rank 0 prints one line per epoch and writes one JSON line per epoch to ``--metrics``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from hpc_dgrab import checkpoint, runtime
from hpc_dgrab.cli import (ArgumentParser, UserError, agree, nonneg_float, positive_float, positive_int,
                           run_main, setup_logging)
from hpc_dgrab.metrics import MetricsLog, format_epoch

log = logging.getLogger("hpc_dgrab.train")

EPILOG = """\
examples:
  launch/local -n 4 -- python -m hpc_dgrab.train --data runs/data/fmnist --model cnn --epochs 5
  srun python -m hpc_dgrab.train --data /scratch/fmnist-64 --model cnn --sync allreduce --metrics m.jsonl

--data is a shard directory written by `python -m hpc_dgrab.data shard` (its shard count must equal
the number of ranks or be a multiple of it), or a built-in source name (digits, fashion-mnist, ...),
which rank 0 shards once into --data-cache. Exit codes: 0 ok, 2 bad input (one line `error: ...`).
"""


def build_parser() -> ArgumentParser:
    """The trainer's command line (the contract in DESIGN.md)."""
    p = ArgumentParser(prog="python -m hpc_dgrab.train", description=__doc__.split("\n\n")[0],
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", required=True, help="shard directory, or a built-in source name to shard on first use")
    g.add_argument("--data-cache", default="runs/data", help="where built-in sources are sharded (default: %(default)s)")
    g.add_argument("--partition", default="iid", help="partition when sharding a built-in source (default: %(default)s)")
    g.add_argument("--model", default="cnn", help="logreg, mlp, cnn, cnn-bn (default: %(default)s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=5, help="passes over each rank's shard (default: %(default)s)")
    g.add_argument("--lr", type=positive_float, default=0.05, help="learning rate (default: %(default)s)")
    g.add_argument("--momentum", type=nonneg_float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="L2 weight decay (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=32, help="examples per rank per step (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model init and the orders (default: %(default)s)")
    g = p.add_argument_group("distribution")
    g.add_argument("--sync", default="allreduce", choices=["allreduce", "horovod", "gossip"],
                   help="allreduce: synchronous SGD over MPI; horovod: the same over Horovod; "
                        "gossip: decentralized asynchronous SGD (default: %(default)s)")
    g.add_argument("--topology", default="ring", help="gossip graph, e.g. ring, exponential (default: %(default)s)")
    g.add_argument("--order", default="rr", help="example order: rr, grab, pairbalance, dgrab (default: %(default)s)")
    g.add_argument("--dgrab-mode", default="parallel", help="D-GraB coordination: parallel or exact (default: %(default)s)")
    g.add_argument("--order-units", default="example", metavar="example|microbatch:K",
                   help="balancing units of grab/pairbalance/dgrab: per-example gradients, or mean gradients "
                        "of K consecutive examples (needed for BatchNorm/Dropout models) (default: %(default)s)")
    g.add_argument("--compress", default="none", choices=["none", "topk", "regtopk"],
                   help="gradient sparsification with error feedback (default: %(default)s)")
    g.add_argument("--density", type=positive_float, default=0.01, help="fraction of entries sent by topk/regtopk (default: %(default)s)")
    g.add_argument("--mu", type=positive_float, default=4.0, help="RegTop-k regularisation (default: %(default)s)")
    g.add_argument("--gradalign-beta", type=nonneg_float, default=None, help="enable GradAlign with this beta")
    g.add_argument("--local-steps", type=positive_int, default=1, help="GradAlign/local SGD steps per round (default: %(default)s)")
    g.add_argument("--straggler", default=None, metavar="RANK:FACTOR", help="make RANK's steps FACTOR times slower")
    g = p.add_argument_group("output")
    g.add_argument("--metrics", default=None, metavar="FILE.jsonl", help="one JSON line per epoch (rank 0 writes)")
    g.add_argument("--checkpoint-dir", default=None, help="save per-rank checkpoints here after every epoch")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    g.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bar on rank 0 (auto: when stderr is a terminal)")
    g.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    return p


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse and check the flags that can be checked before MPI starts (same on every rank)."""
    args = build_parser().parse_args(argv)
    if args.resume and not args.checkpoint_dir:
        raise UserError("--resume needs --checkpoint-dir")
    if args.density > 1:
        raise UserError(f"--density must be in (0, 1], got {args.density}")
    from hpc_dgrab.models import MODELS

    if args.model not in MODELS:
        raise UserError(f"--model: unknown model {args.model!r}; choose from {', '.join(MODELS)}")
    return args


def open_data(args: argparse.Namespace, rt: runtime.Runtime, comm: Any):
    """This rank's training shard and validation slice; shards a built-in source on first use."""
    from hpc_dgrab.data import ShardDataset, ShardError, SourceError

    from hpc_dgrab.data.sources import BUILTIN

    root, problem = args.data, None
    if not os.path.isdir(root):
        if root not in BUILTIN and not root.endswith(".npz"):
            raise UserError(f"--data: {root}: no such shard directory (nor a built-in source: "
                            f"{', '.join(BUILTIN)})", collective=True)
        name = os.path.splitext(os.path.basename(root))[0]
        root = os.path.join(args.data_cache, f"{name}-{rt.size}shards-{args.partition}-s{args.seed}")
        if rt.rank == 0:
            from hpc_dgrab.data import ensure_shards

            try:
                ensure_shards(args.data, root, shards=rt.size, partition=args.partition, seed=args.seed)
            except (SourceError, ShardError, ValueError) as exc:
                problem = f"--data: {exc}"
    agree(problem, comm)
    train = val = None
    try:
        train = ShardDataset(root, rt.rank, rt.size, split="train")
        val = ShardDataset(root, rt.rank, rt.size, split="val")
        if len(train) == 0:
            problem = f"--data: {root}: shard of rank {rt.rank} is empty"
    except (ShardError, OSError, ValueError) as exc:
        problem = f"--data: {exc}"
    agree(problem, comm)
    return train, val


@torch.no_grad()
def evaluate_local(model: nn.Module, data: Any, batch_size: int, device: str) -> np.ndarray:
    """(loss sum, correct, count) of ``model`` on this rank's ``data`` only — no communication."""
    model.eval()
    totals = np.zeros(3)
    step = max(batch_size, 256)
    for lo in range(0, len(data), step):
        x, y = data.get_batch(np.arange(lo, min(lo + step, len(data))))
        out = model(x.to(device))
        y = y.to(device)
        totals += (nn.functional.cross_entropy(out, y, reduction="sum").item(),
                   (out.argmax(1) == y).sum().item(), len(y))
    return totals


def evaluate(model: nn.Module, data: Any, batch_size: int, device: str, comm: Any) -> Dict[str, float]:
    """Loss and accuracy over every rank's validation slice (one all-reduce of three numbers)."""
    totals = evaluate_local(model, data, batch_size, device)
    comm.Allreduce(totals.copy(), totals)
    return {"val_loss": totals[0] / max(totals[2], 1), "val_acc": totals[1] / max(totals[2], 1)}


def resume(args: argparse.Namespace, comm: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
           sorter: Any) -> Tuple[int, Dict[str, Any]]:
    """Collective: with ``--resume``, load the latest checkpoint into model, optimizer, sorter and
    RNG; returns (epoch to start from, the whole state for the loop's own parts)."""
    if not args.resume:
        return 0, {}
    state = checkpoint.load_latest(args.checkpoint_dir, comm)
    if state is None:
        if comm.rank == 0:
            log.info("no checkpoint in %s: starting from scratch", args.checkpoint_dir)
        return 0, {}
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    sorter.load_state_dict(state["sorter"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]), state


def save(args: argparse.Namespace, comm: Any, epoch: int, model: nn.Module,
         optimizer: torch.optim.Optimizer, sorter: Any, **extra: Any) -> None:
    """Collective: with ``--checkpoint-dir``, save every rank's state after ``epoch``."""
    if args.checkpoint_dir:
        checkpoint.save(args.checkpoint_dir, epoch, {
            "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "sorter": sorter.state_dict(), "torch_rng": torch.get_rng_state(), **extra},
            comm, meta={"args": vars(args)})


def report(metrics: MetricsLog, record: Dict[str, Any], epochs: int) -> None:
    """Rank 0: append the epoch's record to the metrics file and print its line."""
    metrics.append(record)
    print(format_epoch(record, epochs), flush=True)


def make_exchanger(args: argparse.Namespace, rt: runtime.Runtime) -> Any:
    """The gradient exchange of the synchronous path: dense all-reduce over MPI or Horovod, or
    (``--compress topk|regtopk``) a sparse all-gather over MPI with error feedback."""
    from hpc_dgrab.comm.collectives import get_backend
    from hpc_dgrab.optim.sync_sgd import DenseExchanger

    if args.compress != "none":
        if args.sync != "allreduce":
            raise UserError(f"--compress {args.compress} needs --sync allreduce (got --sync {args.sync})",
                            collective=True)
        from hpc_dgrab.compress import MPICommunicator, make_exchanger as make_compressed

        return make_compressed(args.compress, None, rt.size, MPICommunicator(runtime.world()),
                               density=args.density, mu=args.mu)
    backend = get_backend("horovod" if args.sync == "horovod" else "mpi")
    return DenseExchanger(backend.allreduce_, rt.size)


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the whole training job on this rank; returns the last epoch's metrics."""
    rt = runtime.get_runtime()
    comm = runtime.world()
    if rt.rank == 0:
        log.info("%d ranks on %d node(s), device %s, %d torch threads per rank, sync %s",
                 rt.size, rt.num_nodes, rt.device, rt.threads, args.sync)
    straggler = _make_straggler(args, rt)
    if args.sync == "gossip":
        return _train_gossip(args, rt, comm, straggler)
    if args.gradalign_beta is not None:
        return _train_gradalign(args, rt, comm, straggler)
    train_data, val_data = open_data(args, rt, comm)

    from hpc_dgrab.models import build_model
    from hpc_dgrab.optim.sync_sgd import SyncSGD
    from hpc_dgrab.order import make_sorter

    try:
        model = build_model(args.model, train_data.input_shape, train_data.num_classes, seed=args.seed)
        sorter = make_sorter(args.order, len(train_data), seed=args.seed, rank=rt.rank, world_size=rt.size,
                             mode=args.dgrab_mode, units=args.order_units)
        sorter.check_model(model)
    except ValueError as exc:
        raise UserError(str(exc), collective=True) from None
    model.to(rt.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    exchanger = straggler.wrap_exchanger(make_exchanger(args, rt))
    driver = straggler.wrap_driver(SyncSGD(model, optimizer, nn.functional.cross_entropy, exchanger))

    start_epoch, state = resume(args, comm, model, optimizer, sorter)
    if state:
        exchanger.load_state_dict(state["exchanger"])
    metrics = MetricsLog(args.metrics if rt.rank == 0 else None, resume_epoch=start_epoch)
    if start_epoch >= args.epochs and rt.rank == 0:
        log.info("checkpoint is at epoch %d >= --epochs %d: nothing to do", start_epoch, args.epochs)
    show_bar = rt.rank == 0 and (args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()))

    record: Dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        bytes0 = exchanger.bytes_sent
        order_bytes0 = driver.order_bytes
        order = sorter.epoch_order()
        # Every rank takes the same number of steps (the smallest shard's), so no rank waits forever.
        steps = comm.allreduce(len(order) // args.batch_size or 1, op=_min_op())
        loss_sum = 0.0
        bar = _progress(steps, epoch, args.epochs) if show_bar else None
        for step in range(steps):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            x, y = train_data.get_batch(idx)
            loss_sum += driver.step(x.to(rt.device), y.to(rt.device), sorter=sorter, indices=idx)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        sorter.end_epoch()
        epoch_time = time.perf_counter() - t0
        sums = comm.allreduce(np.array([loss_sum / steps, exchanger.bytes_sent - bytes0,
                                        driver.order_bytes - order_bytes0]))
        record = {"epoch": epoch + 1, "train_loss": sums[0] / rt.size,
                  **evaluate(model, val_data, args.batch_size, rt.device, comm),
                  "epoch_time_s": float(comm.allreduce(epoch_time, op=_max_op())),
                  "comm_bytes": int(sums[1]), "order_bytes": int(sums[2]), "steps": steps, "ranks": rt.size}
        if rt.rank == 0:
            report(metrics, record, args.epochs)
        save(args, comm, epoch + 1, model, optimizer, sorter, exchanger=exchanger.state_dict())
    return record


# ------------------------------------------------------------------------------------------------
# GradAlign and DASGD (gossip) training loops; dispatched from the top of train().


def _make_straggler(args: argparse.Namespace, rt: runtime.Runtime) -> Any:
    """This rank's ``--straggler`` (a no-op one unless it names this rank)."""
    from hpc_dgrab.optim.straggler import Straggler, parse_straggler

    if args.straggler is None:
        return Straggler(1.0)
    try:
        spec = parse_straggler(args.straggler, rt.size)
    except ValueError as exc:
        raise UserError(str(exc), collective=True) from None
    return Straggler.for_rank(spec, rt.rank)


def _build_for(args: argparse.Namespace, rt: runtime.Runtime, comm: Any, what: str):
    """Data, model, optimizer and sorter for the GradAlign / gossip loops (plain-gradient orders)."""
    if args.compress != "none":
        raise UserError(f"--compress {args.compress} cannot be combined with {what}", collective=True)
    train_data, val_data = open_data(args, rt, comm)
    from hpc_dgrab.models import build_model
    from hpc_dgrab.order import make_sorter

    try:
        model = build_model(args.model, train_data.input_shape, train_data.num_classes, seed=args.seed)
        sorter = make_sorter(args.order, len(train_data), seed=args.seed, rank=rt.rank, world_size=rt.size)
    except ValueError as exc:
        raise UserError(str(exc), collective=True) from None
    if getattr(sorter, "needs_grads", False):
        raise UserError(f"--order {args.order} needs per-example gradients and runs only with the "
                        f"synchronous all-reduce path, not with {what}", collective=True)
    model.to(rt.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    return train_data, val_data, model, optimizer, sorter


def _train_gradalign(args: argparse.Namespace, rt: runtime.Runtime, comm: Any, straggler: Any) -> Dict[str, Any]:
    """GradAlign (``--gradalign-beta``, ``--local-steps K``): one round = K local batches per rank."""
    from hpc_dgrab.comm.collectives import get_backend
    from hpc_dgrab.optim.gradalign import GradAlign

    train_data, val_data, model, optimizer, sorter = _build_for(args, rt, comm, "--gradalign-beta")
    backend = get_backend("horovod" if args.sync == "horovod" else "mpi")
    k, b = args.local_steps, args.batch_size
    driver = GradAlign(model, optimizer, nn.functional.cross_entropy, args.gradalign_beta, k,
                       allreduce_=backend.allreduce_)
    start_epoch, state = resume(args, comm, model, optimizer, sorter)
    if state:
        driver.load_state_dict(state["gradalign"])
    metrics = MetricsLog(args.metrics if rt.rank == 0 else None, resume_epoch=start_epoch)
    record: Dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        bytes0 = driver.bytes_sent
        order = sorter.epoch_order()
        rounds = comm.allreduce(len(order) // (k * b) or 1, op=_min_op())
        loss_sum = 0.0
        for r in range(rounds):
            straggler.begin()  # loading the batches is part of the round's compute
            batches = []
            for j in range(k):
                idx = order[((r * k + j) * b) % len(order):][:b]
                x, y = train_data.get_batch(idx)
                batches.append((x.to(rt.device), y.to(rt.device)))
            comm0 = driver.comm_s
            loss_sum += driver.round(batches)
            straggler.end(driver.comm_s - comm0)
        sorter.end_epoch()
        epoch_time = time.perf_counter() - t0
        sums = comm.allreduce(np.array([loss_sum / rounds, driver.bytes_sent - bytes0]))
        record = {"epoch": epoch + 1, "train_loss": sums[0] / rt.size,
                  **evaluate(model, val_data, b, rt.device, comm),
                  "epoch_time_s": float(comm.allreduce(epoch_time, op=_max_op())),
                  "comm_bytes": int(sums[1]), "steps": rounds * k, "rounds": rounds, "local_steps": k,
                  "gradalign_beta": args.gradalign_beta, "ranks": rt.size}
        if rt.rank == 0:
            report(metrics, record, args.epochs)
        save(args, comm, epoch + 1, model, optimizer, sorter, gradalign=driver.state_dict())
    return record


def _train_gossip(args: argparse.Namespace, rt: runtime.Runtime, comm: Any, straggler: Any) -> Dict[str, Any]:
    """DASGD over push-sum gossip (``--sync gossip --topology NAME``).

    An epoch is one pass over this rank's own shard; ranks never wait for each other while
    training, so per-epoch metrics are gathered without making fast ranks wait: every rank records
    its own epochs (own model on its own validation slice, staleness, traffic) and the records are
    gathered to rank 0 once, after training; rank 0 logs its own epochs live meanwhile. After the
    drain, the network-average model (one all-reduce) and every rank's own model are evaluated on the
    whole validation set; they are added to the last epoch's record. Checkpoints: written once, at
    the end (a per-epoch checkpoint would be a barrier).
    """
    from hpc_dgrab.comm.gossip import GossipEngine
    from hpc_dgrab.comm.topology import Topology
    from hpc_dgrab.tensors import flat_params, set_flat_params
    from hpc_dgrab.optim.dasgd import DASGD

    if args.gradalign_beta is not None:
        raise UserError("--gradalign-beta runs over all-reduce; it cannot be combined with --sync gossip",
                        collective=True)
    train_data, val_data, model, optimizer, sorter = _build_for(args, rt, comm, "--sync gossip")
    try:
        topo = Topology.from_name(args.topology, rt.size, seed=args.seed)
    except ValueError as exc:
        raise UserError(f"--topology: {exc}", collective=True) from None
    params = flat_params(model)
    engine = GossipEngine(topo, params.numel(), dtype=params.dtype, comm=comm)
    driver = DASGD(model, optimizer, nn.functional.cross_entropy, engine, straggler=straggler)
    start_epoch, state = resume(args, comm, model, optimizer, sorter)
    if state:
        driver.ps.x.copy_(state["pushsum_x"])
        driver.ps.w = float(state["pushsum_w"])
        set_flat_params(model, driver.ps.value())
    b = args.batch_size
    mine: List[Dict[str, Any]] = []
    start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        before = engine.stats()
        order = sorter.epoch_order()
        steps = len(order) // b or 1
        loss_sum = 0.0
        for step in range(steps):
            straggler.begin()  # loading the batch is part of the step's compute
            x, y = train_data.get_batch(order[step * b:(step + 1) * b])
            loss_sum += driver.step(x.to(rt.device), y.to(rt.device))
        sorter.end_epoch()
        epoch_time = time.perf_counter() - t0
        val = evaluate_local(model, val_data, b, rt.device)
        window, after = driver.take_window(), engine.stats()
        mine.append({"epoch": epoch + 1, "train_loss": loss_sum / steps, "val": val.tolist(),
                     "epoch_time_s": epoch_time, "wall_s": time.perf_counter() - start, "steps": steps,
                     "stale": [window.count, window.total, window.max], "weight": driver.ps.w,
                     **{key: after[key] - before[key] for key in
                        ("messages_sent", "bytes_sent", "messages_received", "replacements")}})
        if rt.rank == 0:
            log.info("rank 0 epoch %d: train_loss %.4f, own val_acc %.2f%%, %.2fs, staleness avg %.2f max %d",
                     epoch + 1, loss_sum / steps, 100 * val[1] / max(val[2], 1), epoch_time,
                     window.avg, window.max)
    t_drain = time.perf_counter()
    drain_before = engine.stats()
    stats = driver.finish()
    drain_s = time.perf_counter() - t_drain
    closing = driver.take_window()
    if mine:  # what arrived while serving and draining belongs to the last epoch
        last = mine[-1]
        last["stale"] = [last["stale"][0] + closing.count, last["stale"][1] + closing.total,
                         max(last["stale"][2], closing.max)]
        for key in ("messages_sent", "bytes_sent", "messages_received", "replacements"):
            last[key] += stats[key] - drain_before[key]
    # the one collective evaluation: the network-average model ...
    own = flat_params(model)
    set_flat_params(model, driver.average())
    avg_eval = evaluate(model, val_data, b, rt.device, comm)
    set_flat_params(model, own)
    # ... and every rank's own model on the whole validation set
    from hpc_dgrab.data import ShardDataset

    full_val = ShardDataset(val_data.root, 0, 1, split="val")
    own_full = evaluate_local(model, full_val, b, rt.device)
    summary = {"steps": driver.steps, "weight": driver.ps.w, "drain_s": drain_s,
               "own_val_loss": own_full[0] / max(own_full[2], 1), "own_val_acc": own_full[1] / max(own_full[2], 1),
               "serving_pushes": stats["served_pushes"], "close_messages": stats["close_messages"],
               "straggler_idle_s": stats["straggler_idle_s"], "compute_s": stats["compute_s"]}
    gathered = comm.gather((mine, summary), root=0)
    save(args, comm, args.epochs, model, optimizer, sorter, pushsum_x=driver.ps.x.clone(),
         pushsum_w=driver.ps.w)
    record: Dict[str, Any] = {}
    if rt.rank == 0:
        metrics = MetricsLog(args.metrics, resume_epoch=start_epoch)
        per_rank = [g[0] for g in gathered]
        summaries = [g[1] for g in gathered]
        for e in range(len(per_rank[0])):
            recs = [pr[e] for pr in per_rank]
            val = np.sum([r["val"] for r in recs], axis=0)
            count, total, smax = (sum(r["stale"][0] for r in recs), sum(r["stale"][1] for r in recs),
                                  max(r["stale"][2] for r in recs))
            record = {"epoch": recs[0]["epoch"], "train_loss": float(np.mean([r["train_loss"] for r in recs])),
                      "val_loss": val[0] / max(val[2], 1), "val_acc": val[1] / max(val[2], 1),
                      "epoch_time_s": max(r["epoch_time_s"] for r in recs),
                      "comm_bytes": int(sum(r["bytes_sent"] for r in recs)),
                      "staleness_avg": total / count if count else 0.0, "staleness_max": int(smax),
                      "messages": int(sum(r["messages_sent"] for r in recs)),
                      "messages_received": int(sum(r["messages_received"] for r in recs)),
                      "replacements": int(sum(r["replacements"] for r in recs)),
                      "steps": int(sum(r["steps"] for r in recs)), "ranks": rt.size, "topology": topo.name,
                      "steps_ranks": [r["steps"] for r in recs],
                      "epoch_time_s_ranks": [r["epoch_time_s"] for r in recs],
                      "wall_s_ranks": [r["wall_s"] for r in recs],
                      "train_loss_ranks": [r["train_loss"] for r in recs],
                      "staleness_max_ranks": [r["stale"][2] for r in recs],
                      "weight_ranks": [r["weight"] for r in recs]}
            if e == len(per_rank[0]) - 1:
                record.update({"avg_model_val_loss": avg_eval["val_loss"], "avg_model_val_acc": avg_eval["val_acc"],
                               "own_model_val_acc_ranks": [s["own_val_acc"] for s in summaries],
                               "own_model_val_loss_ranks": [s["own_val_loss"] for s in summaries],
                               "drain_s_ranks": [s["drain_s"] for s in summaries],
                               "serving_pushes_ranks": [s["serving_pushes"] for s in summaries],
                               "straggler_idle_s_ranks": [s["straggler_idle_s"] for s in summaries],
                               "compute_s_ranks": [s["compute_s"] for s in summaries],
                               "final_weight_ranks": [s["weight"] for s in summaries]})
            report(metrics, record, args.epochs)
        if record:
            print(f"average model: val_loss {avg_eval['val_loss']:.4f}  val_acc {100 * avg_eval['val_acc']:.2f}%  "
                  f"(own models: {', '.join('%.2f%%' % (100 * s['own_val_acc']) for s in summaries)})", flush=True)
    return comm.bcast(record, root=0)


def _min_op() -> Any:
    from mpi4py import MPI

    return MPI.MIN


def _max_op() -> Any:
    from mpi4py import MPI

    return MPI.MAX


def _progress(total: int, epoch: int, epochs: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging(args.debug)
    train(args)
    return 0


def cli() -> None:
    """Console-script entry point: :func:`main` under the one-line error contract."""
    run_main(main)


if __name__ == "__main__":
    cli()
