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
from typing import Any, Dict, Optional, Sequence

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
def evaluate(model: nn.Module, data: Any, batch_size: int, device: str, comm: Any) -> Dict[str, float]:
    """Loss and accuracy over every rank's validation slice (one all-reduce of three numbers)."""
    model.eval()
    totals = np.zeros(3)  # loss sum, correct, count
    for lo in range(0, len(data), max(batch_size, 256)):
        x, y = data.get_batch(np.arange(lo, min(lo + max(batch_size, 256), len(data))))
        out = model(x.to(device))
        y = y.to(device)
        totals += (nn.functional.cross_entropy(out, y, reduction="sum").item(),
                   (out.argmax(1) == y).sum().item(), len(y))
    comm.Allreduce(totals.copy(), totals)
    return {"val_loss": totals[0] / max(totals[2], 1), "val_acc": totals[1] / max(totals[2], 1)}


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
        raise UserError(str(exc)) from None
    model.to(rt.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    exchanger = make_exchanger(args, rt)
    driver = SyncSGD(model, optimizer, nn.functional.cross_entropy, exchanger)

    start_epoch = 0
    if args.resume:
        state = checkpoint.load_latest(args.checkpoint_dir, comm)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            sorter.load_state_dict(state["sorter"])
            exchanger.load_state_dict(state["exchanger"])
            torch.set_rng_state(state["torch_rng"])
            start_epoch = int(state["epoch"])
        elif rt.rank == 0:
            log.info("no checkpoint in %s: starting from scratch", args.checkpoint_dir)
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
        sums = comm.allreduce(np.array([loss_sum / steps, exchanger.bytes_sent - bytes0, epoch_time,
                                        driver.order_bytes - order_bytes0]))
        record = {"epoch": epoch + 1, "train_loss": sums[0] / rt.size,
                  **evaluate(model, val_data, args.batch_size, rt.device, comm),
                  "epoch_time_s": float(comm.allreduce(epoch_time, op=_max_op())),
                  "comm_bytes": int(sums[1]), "order_bytes": int(sums[3]), "steps": steps, "ranks": rt.size}
        if rt.rank == 0:
            metrics.append(record)
            print(format_epoch(record, args.epochs), flush=True)
        if args.checkpoint_dir:
            checkpoint.save(args.checkpoint_dir, epoch + 1, {
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "sorter": sorter.state_dict(), "exchanger": exchanger.state_dict(),
                "torch_rng": torch.get_rng_state()}, comm, meta={"args": vars(args)})
    return record


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
