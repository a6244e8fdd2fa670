"""One DDP training run with a communication hook, for the time-to-accuracy benchmark (not a CLI of
the library; started by ``python -m benchmarks time-to-accuracy`` under ``launch/netem run``).

``python -m benchmarks._ddp_train --data SHARDS --model M --epochs E --lr LR --batch-size B --seed S
--metrics FILE.jsonl --hook none|fp16|powersgd|topk|regtopk [--density D] [--powersgd-rank R]``

The same problem as ``python -m hpc_dgrab.train`` with its defaults (this rank's shard, SGD with
momentum 0.9, random reshuffling seeded by seed and epoch, the last partial batch dropped, the
validation slice evaluated after every epoch), but the model is wrapped in
``torch.nn.parallel.DistributedDataParallel`` over gloo (``hd.init(backend="gloo")``; under
``launch/netem`` the benchmark sets ``MASTER_ADDR`` to host 0 and ``GLOO_SOCKET_IFNAME``) and the
gradients go through the hook:

* ``none``: torch's ``allreduce_hook`` (so that its bytes are counted like the others');
* ``fp16``: torch's ``fp16_compress_hook``;
* ``powersgd``: torch's ``powerSGD_hook`` (``matrix_approximation_rank`` = ``--powersgd-rank``,
  ``start_powerSGD_iter`` 2, error feedback and warm start on);
* ``topk`` / ``regtopk``: ``hd.ddp.topk_hook`` / ``hd.ddp.regtopk_hook`` at ``--density``.

Rank 0 appends one JSON line per epoch with the trainer's keys (``epoch``, ``train_loss``,
``val_loss``, ``val_acc``, ``epoch_time_s``, ``comm_bytes``, ``steps``, ``ranks``, ``config``).
``comm_bytes`` is measured, not computed: every ``torch.distributed`` collective the hooks call is
counted by the bytes of its input tensor, summed over the ranks (the trainer's convention).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI

import hpc_dgrab as hd
from hpc_dgrab import runtime
from hpc_dgrab.cli import ArgumentParser, positive_float, positive_int, run_main
from hpc_dgrab.data import ShardDataset
from hpc_dgrab.metrics import MetricsLog
from hpc_dgrab.models import build_model
from hpc_dgrab.training.evaluation import evaluate

HOOKS = ("none", "fp16", "powersgd", "topk", "regtopk")


class ByteCounter:
    """Counts the input bytes of the ``torch.distributed`` collectives called while installed."""

    #: name -> position of the input tensor among the positional arguments
    INPUT = {"all_reduce": 0, "all_gather_into_tensor": 1, "all_gather_single": 1, "all_gather": 1}

    def __init__(self) -> None:
        self.bytes = 0

    def install(self) -> None:
        for name, pos in self.INPUT.items():
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(original, pos))

    def _wrap(self, original: Callable[..., Any], pos: int) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            tensor = args[pos]
            self.bytes += tensor.numel() * tensor.element_size()
            return original(*args, **kwargs)
        return counted


def make_hook(model: torch.nn.Module, name: str, density: float, rank: int) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if name == "none":
        model.register_comm_hook(None, default_hooks.allreduce_hook)
    elif name == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                            start_powerSGD_iter=2, min_compression_rate=2,
                                            use_error_feedback=True, warm_start=True)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif name == "topk":
        hd.ddp.register(model, hd.ddp.TopKState(density=density))
    else:
        hd.ddp.register(model, hd.ddp.RegTopKState(density=density))


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks._ddp_train", description=__doc__.splitlines()[0],
                       epilog="\n".join(__doc__.splitlines()[2:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard directory (one shard per rank)")
    p.add_argument("--model", default="cnn", help="built-in model (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--lr", type=positive_float, default=0.05)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", required=True, help="JSONL file rank 0 appends an epoch record to")
    p.add_argument("--hook", choices=HOOKS, default="none")
    p.add_argument("--density", type=positive_float, default=0.01, help="topk/regtopk density")
    p.add_argument("--powersgd-rank", type=positive_int, default=2, help="PowerSGD matrix rank")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    hd.init(backend="gloo")
    comm = runtime.world()
    rank, size = comm.rank, comm.size
    torch.set_num_threads(1)
    train = ShardDataset(args.data, rank, size, split="train")
    val = ShardDataset(args.data, rank, size, split="val")
    model = torch.nn.parallel.DistributedDataParallel(
        build_model(args.model, train.input_shape, train.num_classes, seed=args.seed))
    make_hook(model, args.hook, args.density, args.powersgd_rank)
    counter = ByteCounter()
    counter.install()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps = comm.allreduce(len(train) // args.batch_size, op=MPI.MIN)
    log = MetricsLog(args.metrics if rank == 0 else None)
    config = {"ranks": size, "model": args.model, "sync": "ddp", "hook": args.hook,
              "density": args.density if args.hook in ("topk", "regtopk") else None,
              "batch_size": args.batch_size, "lr": args.lr}
    for epoch in range(1, args.epochs + 1):
        order = np.random.default_rng([args.seed, epoch, rank]).permutation(len(train))
        model.train()
        losses: List[float] = []
        sent0 = counter.bytes
        comm.Barrier()
        t0 = time.perf_counter()
        for s in range(steps):
            x, y = train.get_batch(np.sort(order[s * args.batch_size:(s + 1) * args.batch_size]))
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        comm.Barrier()
        epoch_s = time.perf_counter() - t0
        sent = comm.allreduce(counter.bytes - sent0)
        train_loss = comm.allreduce(float(np.mean(losses))) / size
        scores = evaluate(model.module, val, 256, "cpu", comm)
        log.append({"epoch": epoch, "train_loss": train_loss, **scores, "epoch_time_s": epoch_s,
                    "comm_bytes": int(sent), "order_bytes": 0, "steps": steps, "ranks": size,
                    "config": config})
    hd.shutdown()
    # DDP's reducer still holds the gloo group; its destructor at interpreter exit can deadlock
    # with gloo's threads (pytorch#56297, seen in benchmarks/peers.py): end without destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    if not MPI.Is_finalized():
        MPI.Finalize()
    os._exit(0)


if __name__ == "__main__":
    run_main(main)
