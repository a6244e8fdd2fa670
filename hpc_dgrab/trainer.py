"""The one training loop of ``python -m hpc_dgrab.train``: a :class:`Trainer` over pluggable drivers.

The trainer owns everything that is the same for every method, written once: the data (each rank
its own shard), the sorter (the example order), resume and checkpoints, evaluation, metrics,
progress, the straggler / fault-injection hook, preemption and failure handling. A *driver* owns
one step of one method:

* :class:`SyncDriver` — synchronous SGD (dense all-reduce over MPI or Horovod, or sparse all-gather
  with Top-k / RegTop-k and error feedback); D-GraB's order payload and the trainer's control flags
  ride in the same message as the gradient.
* :class:`GradAlignDriver` — GradAlign / local SGD, one step = one round of ``--local-steps`` batches.
* :class:`GossipDriver` — DASGD over non-blocking push-sum gossip; ranks never wait for each other.

Driver interface: ``step(batches, stop) -> StepResult`` (``batches`` = ``batches_per_step`` tuples
``(x, y, indices)``; ``stop`` = this rank wants to stop), ``counters()`` (cumulative per-rank numbers
such as bytes sent), ``record_fields(steps)``, ``end_epoch()``, ``finish()``,
``state_dict()`` / ``load_state_dict()``. ``synchronous`` drivers take the same steps on every rank
and return the same ``stop`` / ``bad`` on every rank at the same step.

Stopping (the contract batch schedulers rely on). SIGTERM and SIGUSR1 only set a flag. At the next
step boundary every rank learns whether any rank has the flag: on the synchronous SGD path the flag
is one float appended to the gradient message; GradAlign adds one 2-number all-reduce per round
(a round already holds two model-sized all-reduces); gossip polls a non-blocking all-reduce, one in
flight at a time, so no rank ever waits for another (ranks stop at their own step). The job then
drains (gossip: serve until every rank stopped, absorb every share in flight, so the push-sum mass
is conserved), writes a checkpoint of the running epoch — position in the epoch, model, optimizer,
sorter in-progress state, compressor memory, driver state, RNGs of torch, numpy and Python, the
epoch's partial loss — prints ``stopped by SIGUSR1 at epoch E step S; checkpoint in DIR; continue
with --resume`` and exits with :data:`hpc_dgrab.errors.EXIT_PREEMPTED` (75). A signal that arrives
when the last step of the last epoch is done lets the run finish (exit 0). Without
``--checkpoint-dir`` it saves nothing and exits 130. On the synchronous paths a stopped and resumed
run takes exactly the steps of an uninterrupted one.

Failures. A non-finite loss or gradient (parameters, for the model-averaging drivers) on any rank
travels in the same control flags; all ranks stop at once, write nothing, and exit 2 with one line
naming the lowest such rank and its step.

Fault injection (tests use it): the loop marks the point ``train.step`` before every step, at the
same single hook point as ``--straggler``; e.g. ``HPC_DGRAB_FAULT=train.step#40@1:SIGUSR1`` makes rank
1 send itself SIGUSR1 before its 40th step in this process (see :mod:`hpc_dgrab.faults`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from hpc_dgrab import checkpoint, faults, locks, runtime
from hpc_dgrab.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError, agree
from hpc_dgrab.metrics import MetricsLog, format_epoch, rank_path

log = logging.getLogger(__name__)

Batch = Tuple[torch.Tensor, torch.Tensor, np.ndarray]

# ------------------------------------------------------------------------------------------------
# Which combinations run (the README's table is generated from these two functions).

SYNCS = ("allreduce", "horovod", "gossip")
ORDERS = ("rr", "grab", "pairbalance", "dgrab")
COMPRESSIONS = ("none", "topk", "regtopk")
GRADIENT_ORDERS = ("grab", "pairbalance", "dgrab")  # they balance per-example gradients of the step


def combination_problem(sync: str, order: str, compress: str, gradalign: bool) -> Optional[str]:
    """Why ``--sync`` x ``--order`` x ``--compress`` x ``--gradalign-beta`` cannot run (None: it can)."""
    if gradalign and sync == "gossip":
        return "--gradalign-beta averages models with all-reduce; it cannot run with --sync gossip"
    if compress != "none" and sync != "allreduce":
        return f"--compress {compress} sends a sparse all-gather over MPI; it needs --sync allreduce"
    if compress != "none" and gradalign:
        return f"--compress {compress} compresses gradient steps; GradAlign exchanges whole models"
    if order in GRADIENT_ORDERS and sync == "gossip":
        return (f"--order {order} balances per-example gradients inside the synchronous gradient step; "
                "gossip has no such step")
    if order in GRADIENT_ORDERS and gradalign:
        return (f"--order {order} balances per-example gradients inside the synchronous gradient step; "
                "GradAlign's local steps have no such step")
    return None


def unused_flag_problem(given: Sequence[str], cfg: "TrainConfig") -> Optional[str]:
    """Why a flag the user GAVE (``given``: dest names) does nothing with ``cfg`` (None: all used)."""
    rules: List[Tuple[str, bool, str]] = [
        ("topology", cfg.sync == "gossip", "--topology is the gossip graph; it needs --sync gossip"),
        ("local_steps", cfg.gradalign_beta is not None, "--local-steps needs --gradalign-beta"),
        ("dgrab_mode", cfg.order == "dgrab", "--dgrab-mode needs --order dgrab"),
        ("dgrab_payload", cfg.order == "dgrab" and cfg.dgrab_mode == "parallel",
         "--dgrab-payload needs --order dgrab --dgrab-mode parallel"),
        ("order_units", cfg.order in GRADIENT_ORDERS,
         "--order-units needs --order grab, pairbalance or dgrab"),
        ("density", cfg.compress != "none", "--density needs --compress topk or regtopk"),
        ("mu", cfg.compress == "regtopk", "--mu needs --compress regtopk"),
        ("checkpoint_every", cfg.checkpoint_dir is not None, "--checkpoint-every needs --checkpoint-dir"),
        ("checkpoint_every", cfg.sync != "gossip",
         "--checkpoint-every would be a barrier for gossip; --sync gossip checkpoints at the end "
         "and when stopped by a signal"),
        ("resume", cfg.checkpoint_dir is not None, "--resume needs --checkpoint-dir"),
    ]
    for dest, ok, reason in rules:
        if dest in given and not ok:
            return reason
    return None


def combinations_markdown() -> str:
    """The README's table of every combination, each supported or refused with its one-line reason."""
    lines = ["| --sync | --order | --compress | --gradalign-beta | runs? |",
             "|---|---|---|---|---|"]
    for sync in SYNCS:
        for order in ORDERS:
            for compress in COMPRESSIONS:
                for gradalign in (False, True):
                    problem = combination_problem(sync, order, compress, gradalign)
                    lines.append(f"| {sync} | {order} | {compress} | {'BETA' if gradalign else '-'} | "
                                 f"{'yes' if problem is None else 'no: ' + problem} |")
    return "\n".join(lines) + "\n"


# Settings a checkpoint must have been written with to be resumed (flag -> TrainConfig field).
#: what a setting left out of a checkpoint's settings (see ``resume_settings``) stood for
RESUME_DEFAULTS = {"dgrab_payload": "full"}
RESUME_KEYS = ("model", "sync", "topology", "order", "dgrab_mode", "dgrab_payload", "order_units", "compress",
               "density", "mu", "gradalign_beta", "local_steps", "batch_size")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training job needs (the trainer's flags, defaults resolved)."""

    data: str
    model: str = "cnn"
    epochs: int = 5
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    seed: int = 0
    data_cache: str = "runs/data"
    partition: str = "iid"
    sync: str = "allreduce"
    topology: str = "ring"
    order: str = "rr"
    dgrab_mode: str = "parallel"
    dgrab_payload: str = "full"
    order_units: str = "example"
    compress: str = "none"
    density: float = 0.01
    mu: float = 4.0
    gradalign_beta: Optional[float] = None
    local_steps: int = 1
    straggler: Optional[str] = None
    metrics: Optional[str] = None
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 1
    resume: bool = False
    progress: str = "auto"
    debug: bool = False

    def resume_settings(self, world_size: int) -> Dict[str, Any]:
        """The settings stored in a checkpoint's meta and compared on ``--resume``."""
        out: Dict[str, Any] = {"ranks": world_size}
        for key in RESUME_KEYS:
            out[key] = getattr(self, key)
        if self.sync != "gossip":
            out.pop("topology")
        if self.order != "dgrab":
            out.pop("dgrab_mode")
        if self.order != "dgrab" or self.dgrab_payload == "full":   # checkpoints from before the flag
            out.pop("dgrab_payload")
        if self.order not in GRADIENT_ORDERS:
            out.pop("order_units")
        if self.compress == "none":
            out.pop("density")
        if self.compress != "regtopk":
            out.pop("mu")
        if self.gradalign_beta is None:
            out.pop("local_steps")
        return out


# ------------------------------------------------------------------------------------------------
# Signals, the control flags and the one hook point


class StopFlag:
    """SIGTERM / SIGUSR1 set ``signum``; the handler does nothing else."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal API
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


#: the process's stop flag (installed by the command's main before anything slow)
STOP = StopFlag()


@dataclasses.dataclass
class StepResult:
    """What a driver's step tells the loop. ``stop`` / ``bad``: some rank wants to stop / saw a
    non-finite number (synchronous drivers: the same on every rank at the same step)."""

    loss: float          # this rank's mean loss of the step
    comm_s: float        # seconds of the step spent communicating (not compute, for --straggler)
    stop: bool = False
    bad: bool = False
    local_bad: bool = False


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ------------------------------------------------------------------------------------------------
# Drivers


class SyncDriver:
    """Synchronous SGD (``--sync allreduce|horovod``, any ``--order``, ``--compress``) on the public
    API: :func:`hpc_dgrab.DistributedOptimizer` (bucketed all-reduce overlapped with backward, or
    Top-k / RegTop-k sparse all-gather with error feedback) and :class:`hpc_dgrab.OrderedSampler`
    (GraB / PairBalance / D-GraB unit gradients; D-GraB's order data in the payload channel).

    The control vector ``[stop, non-finite loss]`` is one more payload, so it rides in the same
    message as the gradient. A step whose summed control says non-finite, or whose mean gradient
    (the same on every rank) is not finite, is not applied."""

    synchronous = True
    batches_per_step = 1

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: Any,
                 compression: Any, backend: str) -> None:
        from hpc_dgrab.optim.distributed import DistributedOptimizer

        self.model, self.sampler = model, sampler
        self.opt = DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                        compression=compression, backend=backend)
        self.order_bytes = 0
        self._elem = next(model.parameters()).element_size()
        sampler.attach(self)  # the sampler's payloads go through add_payload below (counted)

    def add_payload(self, tensor: torch.Tensor, on_result: Optional[Callable[[torch.Tensor], Any]] = None) -> Any:
        """The sorter's order data: into the optimizer's payload channel, counted in ``order_bytes``."""
        self.order_bytes += tensor.numel() * self._elem
        return self.opt.add_payload(tensor, on_result)

    def step(self, batches: Sequence[Batch], stop: bool) -> StepResult:
        (x, y, idx), = batches
        self.model.train()
        self.opt.zero_grad()
        loss = float(self.sampler.backward(self.model, nn.functional.cross_entropy, x, y, indices=idx))
        local_bad = not math.isfinite(loss)
        control = self.opt.add_payload(torch.tensor([float(stop), float(local_bad)]))
        t0 = time.perf_counter()
        self.opt.synchronize()
        comm_s = time.perf_counter() - t0
        bad = bool(control.value[1] > 0) or not _finite(*(p.grad for p in self.model.parameters()
                                                          if p.grad is not None))
        if bad:
            self.opt.zero_grad()
        else:
            with self.opt.skip_synchronize():
                self.opt.step()
        return StepResult(loss, comm_s, bool(control.value[0] > 0), bad, local_bad)

    def counters(self) -> Dict[str, float]:
        return {"comm_bytes": self.opt.bytes_sent, "order_bytes": self.order_bytes}

    def record_fields(self, steps: int) -> Dict[str, Any]:
        return {"steps": steps}

    def end_epoch(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {"order_bytes": self.order_bytes}  # the optimizer (with compression memory) is saved as such

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.order_bytes = int(state.get("order_bytes", 0))


class GradAlignDriver:
    """GradAlign (``--gradalign-beta``): one step is one round of ``--local-steps`` batches; the
    control flags take one extra 2-number all-reduce per round (counted in ``comm_bytes``)."""

    synchronous = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, beta: float, local_steps: int,
                 allreduce_: Callable[[torch.Tensor], Any], comm: Any) -> None:
        from hpc_dgrab.optim.gradalign import GradAlign

        self.ga = GradAlign(model, optimizer, nn.functional.cross_entropy, beta, local_steps, allreduce_=allreduce_)
        self.model, self.comm, self.beta = model, comm, beta
        self.batches_per_step = local_steps
        self.control_bytes = 0

    def step(self, batches: Sequence[Batch], stop: bool) -> StepResult:
        comm0 = self.ga.comm_s
        loss = self.ga.round([(x, y) for x, y, _ in batches])
        bad = not (math.isfinite(loss) and _finite(*self.model.parameters()))
        t0 = time.perf_counter()
        flags = np.array([int(stop), int(bad)], dtype=np.int32)
        self.comm.Allreduce(flags.copy(), flags, op=_mpi_op("MAX"))
        self.control_bytes += flags.nbytes
        comm_s = self.ga.comm_s - comm0 + time.perf_counter() - t0
        return StepResult(loss, comm_s, bool(flags[0]), bool(flags[1]), bad)

    def counters(self) -> Dict[str, float]:
        return {"comm_bytes": self.ga.bytes_sent + self.control_bytes}

    def record_fields(self, steps: int) -> Dict[str, Any]:
        return {"steps": steps * self.batches_per_step, "rounds": steps, "local_steps": self.batches_per_step,
                "gradalign_beta": self.beta}

    def end_epoch(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {"gradalign": self.ga.state_dict(), "control_bytes": self.control_bytes}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.ga.load_state_dict(state["gradalign"])
        self.control_bytes = int(state.get("control_bytes", 0))


class GossipDriver:
    """DASGD over push-sum gossip (``--sync gossip --topology NAME``); not synchronous.

    Control flags: a non-blocking all-reduce (MAX of ``[stop, non-finite]``) on its own
    communicator, one in flight; every step tests it and, once complete, reads it and posts the
    next with this rank's current flags. A rank therefore learns of a stop within a few of its own
    steps, without ever waiting for a slower rank. :meth:`finish` serves and drains the gossip (the
    push-sum mass is conserved), then retires the last control round on every rank.
    """

    synchronous = False
    batches_per_step = 1
    STAT_KEYS = ("messages_sent", "bytes_sent", "messages_received", "replacements", "skipped_pushes")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, topology: Any, comm: Any) -> None:
        from hpc_dgrab.comm.gossip import GossipEngine
        from hpc_dgrab.optim.dasgd import DASGD
        from hpc_dgrab.tensors import flat_params

        params = flat_params(model)
        self.model, self.topology = model, topology
        self.engine = GossipEngine(topology, params.numel(), dtype=params.dtype, comm=comm)
        self.dasgd = DASGD(model, optimizer, nn.functional.cross_entropy, self.engine)
        self._comm, self._ctl_comm = comm, comm.Dup()
        self._req: Any = None
        self._ctl_rounds = 0
        self._ctl_recv = np.zeros(2, dtype=np.int32)
        self._ctl_send = np.zeros(2, dtype=np.int32)
        self._agreed = (False, False)
        self._epoch_stats = self.engine.stats()
        self.bytes_before = 0  # sent before a resume (by the engines of earlier runs)
        self.drain_s = 0.0
        self.finish_stats: Dict[str, Any] = {}

    def _post(self, stop: bool, bad: bool) -> None:
        self._ctl_send = np.array([int(stop), int(bad)], dtype=np.int32)
        self._ctl_recv = np.zeros(2, dtype=np.int32)
        self._req = self._ctl_comm.Iallreduce(self._ctl_send, self._ctl_recv, op=_mpi_op("MAX"))
        self._ctl_rounds += 1

    def step(self, batches: Sequence[Batch], stop: bool) -> StepResult:
        (x, y, _), = batches
        loss = self.dasgd.compute(x, y)
        t0 = time.perf_counter()
        self.dasgd.push()
        self.dasgd.merge_arrived()
        bad = not (math.isfinite(loss) and _finite(self.dasgd.ps.numerator))
        if self._req is None:
            self._post(stop, bad)
        elif self._req.Test():
            self._agreed = (self._agreed[0] or bool(self._ctl_recv[0]), self._agreed[1] or bool(self._ctl_recv[1]))
            self._post(stop, bad)
        # no lock-step here: this rank stops at once on its own flag; the others learn it from a round
        return StepResult(loss, time.perf_counter() - t0, self._agreed[0] or stop, self._agreed[1] or bad, bad)

    def counters(self) -> Dict[str, float]:
        return {"comm_bytes": self.engine.stats()["bytes_sent"] + self.bytes_before}

    def record_fields(self, steps: int) -> Dict[str, Any]:
        return {"steps": steps}

    def end_epoch(self) -> None:
        pass

    def epoch_local(self) -> Dict[str, Any]:
        """This rank's gossip numbers of the epoch just ended (staleness window, traffic, weight)."""
        window, after = self.dasgd.take_window(), self.engine.stats()
        out = {"stale": [window.count, window.total, window.max], "weight": self.dasgd.ps.w,
               **{k: after[k] - self._epoch_stats[k] for k in self.STAT_KEYS}}
        self._epoch_stats = after
        return out

    def finish(self) -> None:
        if self.dasgd.finished:
            return
        t0 = time.perf_counter()
        before = self.engine.stats()
        stats = self.dasgd.finish()
        self.drain_s = time.perf_counter() - t0
        closing = self.dasgd.take_window()
        self.finish_stats = {"closing": [closing.count, closing.total, closing.max],
                             **{k: stats[k] - before[k] for k in self.STAT_KEYS},
                             "served_pushes": stats["served_pushes"], "close_messages": stats["close_messages"],
                             "compute_s": stats["compute_s"]}
        # every rank has one control round in flight or completed; bring them to the same count
        # (counted on the world communicator: the control one may still hold a round in flight)
        rounds = self._comm.allreduce(self._ctl_rounds, op=_mpi_op("MAX"))
        if self._req is not None:
            self._req.Wait()
        while self._ctl_rounds < rounds:
            self._post(False, False)
            self._req.Wait()
        self._ctl_comm.Free()

    def average_model(self) -> torch.Tensor:
        """Collective: the network-average model (after :meth:`finish`)."""
        return self.dasgd.average()

    def state_dict(self) -> Dict[str, Any]:
        return {"x": self.dasgd.ps.x.clone(), "w": float(self.dasgd.ps.w), "steps": self.dasgd.steps,
                "bytes_sent": int(self.counters()["comm_bytes"])}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        from hpc_dgrab.tensors import set_flat_params

        self.dasgd.ps.x.copy_(torch.as_tensor(state["x"]))
        self.dasgd.ps.w = float(state["w"])
        self.dasgd.steps = int(state["steps"])
        self.bytes_before = int(state.get("bytes_sent", 0))
        set_flat_params(self.model, self.dasgd.ps.value())


# ------------------------------------------------------------------------------------------------
# State that is not a driver's


def _rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [kind, keys, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))


def _optimizer_state(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The optimizer's state with string keys only (parameter index -> its buffers)."""
    sd = dict(optimizer.state_dict())
    return {**sd, "state": [[int(i), dict(s)] for i, s in sorted(sd["state"].items())]}


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    groups = [dict(g) for g in state["param_groups"]]
    for g in groups:
        g["params"] = [int(p) for p in g["params"]]
    optimizer.load_state_dict({**state, "state": {int(i): s for i, s in state["state"]}, "param_groups": groups})


@dataclasses.dataclass
class EpochProgress:
    """The running epoch's partial numbers (kept in a mid-epoch checkpoint)."""

    loss_sum: float = 0.0
    elapsed_s: float = 0.0
    counters0: Dict[str, float] = dataclasses.field(default_factory=dict)


class Preempted(Exception):
    """Raised on every rank after a signal stopped the job; ``code`` is the exit code."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(line)
        self.line, self.code = line, code


# ------------------------------------------------------------------------------------------------
# Data and evaluation


def open_data(cfg: TrainConfig, rt: runtime.Runtime, comm: Any) -> Tuple[Any, Any]:
    """This rank's training shard and validation slice; shards a built-in source on first use."""
    from hpc_dgrab.data import ShardDataset, ShardError, SourceError
    from hpc_dgrab.data.sources import BUILTIN

    root, problem = cfg.data, None
    if not os.path.isdir(root):
        if root not in BUILTIN and not root.endswith(".npz"):
            raise UserError(f"--data: {root}: no such shard directory (nor a built-in source: "
                            f"{', '.join(BUILTIN)})", collective=True)
        name = os.path.splitext(os.path.basename(root))[0]
        root = os.path.join(cfg.data_cache, f"{name}-{rt.size}shards-{cfg.partition}-s{cfg.seed}")
        if rt.rank == 0:
            from hpc_dgrab.data import ensure_shards

            try:
                ensure_shards(cfg.data, root, shards=rt.size, partition=cfg.partition, seed=cfg.seed)
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


def _val_dict(totals: Sequence[float]) -> Dict[str, float]:
    return {"val_loss": float(totals[0]) / max(totals[2], 1), "val_acc": float(totals[1]) / max(totals[2], 1)}


def evaluate(model: nn.Module, data: Any, batch_size: int, device: str, comm: Any) -> Dict[str, float]:
    """Loss and accuracy over every rank's validation slice (one all-reduce of three numbers)."""
    totals = evaluate_local(model, data, batch_size, device)
    comm.Allreduce(totals.copy(), totals)
    return _val_dict(totals)


def _mpi_op(name: str) -> Any:
    from mpi4py import MPI

    return getattr(MPI, name)


# ------------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """One training job on this rank: build, resume, the loop, checkpoints, metrics, summary.

    ``run()`` returns the last epoch's record (the same on every rank); it raises
    :class:`Preempted` after a signal and :class:`~hpc_dgrab.errors.UserError` on bad input or a
    non-finite loss.
    """

    def __init__(self, cfg: TrainConfig, stop: StopFlag = STOP) -> None:
        self.cfg, self.stop = cfg, stop
        self.rt = runtime.get_runtime()
        self.comm = runtime.world()

    # ---------------------------------------------------------------- building
    def _build(self) -> None:
        from hpc_dgrab.models import build_model
        from hpc_dgrab.optim.straggler import Straggler, parse_straggler
        from hpc_dgrab.order import make_sorter

        cfg, rt, comm = self.cfg, self.rt, self.comm
        problem = combination_problem(cfg.sync, cfg.order, cfg.compress, cfg.gradalign_beta is not None)
        if problem:
            raise UserError(problem, collective=True)
        try:
            spec = None if cfg.straggler is None else parse_straggler(cfg.straggler, rt.size)
        except ValueError as exc:
            raise UserError(str(exc), collective=True) from None
        self.straggler = Straggler.for_rank(spec, rt.rank)
        topology = None
        if cfg.sync == "gossip":
            from hpc_dgrab.comm.topology import Topology

            try:
                topology = Topology.from_name(cfg.topology, rt.size, seed=cfg.seed)
            except ValueError as exc:
                raise UserError(f"--topology: {exc}", collective=True) from None
        self.train_data, self.val_data = open_data(cfg, rt, comm)
        try:
            self.model = build_model(cfg.model, self.train_data.input_shape, self.train_data.num_classes,
                                     seed=cfg.seed)
            self.sorter = make_sorter(cfg.order, len(self.train_data), seed=cfg.seed, rank=rt.rank,
                                      world_size=rt.size, mode=cfg.dgrab_mode, units=cfg.order_units,
                                      payload=cfg.dgrab_payload)
            self.sorter.check_model(self.model)
        except ValueError as exc:
            raise UserError(str(exc), collective=True) from None
        self.model.to(rt.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        if cfg.sync == "gossip":
            self.driver: Any = GossipDriver(self.model, self.optimizer, topology, comm)
        elif cfg.gradalign_beta is not None:
            from hpc_dgrab.comm.collectives import get_backend

            backend = get_backend("horovod" if cfg.sync == "horovod" else "mpi")
            self.driver = GradAlignDriver(self.model, self.optimizer, cfg.gradalign_beta, cfg.local_steps,
                                          backend.allreduce_, comm)
        else:
            from hpc_dgrab import api
            from hpc_dgrab.optim.distributed import RegTopK, TopK
            from hpc_dgrab.optim.sampler import OrderedSampler

            api.init(comm)
            sampler = OrderedSampler(len(self.train_data), order=cfg.order, seed=cfg.seed, mode=cfg.dgrab_mode,
                                     units=cfg.order_units, payload=cfg.dgrab_payload)
            sampler.sorter = self.sorter  # the trainer's sorter (checked against the model above)
            compression = {"none": None, "topk": lambda: TopK(density=cfg.density),
                           "regtopk": lambda: RegTopK(density=cfg.density, mu=cfg.mu)}[cfg.compress]
            self.driver = SyncDriver(self.model, self.optimizer, sampler, compression and compression(),
                                     "horovod" if cfg.sync == "horovod" else "mpi")
            self.optimizer = self.driver.opt  # the distributed optimizer is what gets saved

    @contextlib.contextmanager
    def _locks(self) -> Any:
        """Rank 0 holds the checkpoint directory and the metrics file for the whole job."""
        with contextlib.ExitStack() as stack:
            problem = None
            if self.rt.rank == 0:
                try:
                    if self.cfg.checkpoint_dir:
                        os.makedirs(self.cfg.checkpoint_dir, exist_ok=True)
                        stack.enter_context(locks.hold(self.cfg.checkpoint_dir, "--checkpoint-dir", directory=True))
                    if self.cfg.metrics:
                        stack.enter_context(locks.hold(self.cfg.metrics, "--metrics", directory=False))
                except (UserError, OSError) as exc:
                    problem = str(exc)
            agree(problem, self.comm)
            yield

    # ---------------------------------------------------------------- checkpoints
    def _config_label(self) -> Dict[str, Any]:
        """The run's settings in every metrics record (the plot labels runs by what differs)."""
        return {**self.cfg.resume_settings(self.rt.size), "lr": self.cfg.lr}

    def _meta(self) -> Dict[str, Any]:
        return {"settings": self.cfg.resume_settings(self.rt.size)}

    def _resume(self) -> Tuple[Tuple[int, int], EpochProgress, List[Dict[str, Any]]]:
        """Collective: ((epoch, step) this rank starts at, the running epoch's progress, gossip history)."""
        cfg = self.cfg
        if not cfg.resume:
            return (0, 0), EpochProgress(), []
        loaded = checkpoint.load_latest(cfg.checkpoint_dir, self.comm)
        if loaded is None:
            if self.rt.rank == 0:
                log.info("--resume: no checkpoint in %s: starting from scratch", cfg.checkpoint_dir)
            return (0, 0), EpochProgress(), []
        saved = (loaded.meta or {}).get("settings", {})
        mine = cfg.resume_settings(self.rt.size)
        for key in sorted(set(saved) | set(mine)):
            was, now = (settings.get(key, RESUME_DEFAULTS.get(key, "(not used)")) for settings in (saved, mine))
            if was != now:
                flag = "ranks" if key == "ranks" else "--" + key.replace("_", "-")
                raise UserError(f"--resume: {cfg.checkpoint_dir} was written with {flag} {was}, "
                                f"this run has {flag} {now}; use the same settings or a new "
                                f"--checkpoint-dir", collective=True)
        state = loaded.state
        problem = None
        try:
            self.model.load_state_dict(state["model"])
            _load_optimizer_state(self.optimizer, state["optimizer"])
            self.sorter.load_state_dict(state["sorter"])
            self.driver.load_state_dict(state["driver"])
            _set_rng_state(state["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            problem = f"--resume: {cfg.checkpoint_dir}: checkpoint does not fit this run ({exc})".splitlines()[0]
        agree(problem, self.comm)
        p = state["progress"]
        progress = EpochProgress(float(p["loss_sum"]), float(p["elapsed_s"]),
                                 {k: float(v) for k, v in p["counters0"].items()})
        epoch, step = (int(v) for v in state["own"])
        if self.rt.rank == 0:
            log.info("resuming from %s at epoch %d step %d", cfg.checkpoint_dir, epoch + 1, step)
        return (epoch, step), progress, list(state.get("history", []))

    def _save(self, own: Tuple[int, int], progress: EpochProgress, history: List[Dict[str, Any]]) -> str:
        """Collective: write every rank's state at its position ``own``; returns the directory."""
        epoch = self.comm.allreduce(own[0] * 2 ** 32 + own[1], op=_mpi_op("MIN"))
        position = checkpoint.Position(epoch // 2 ** 32, epoch % 2 ** 32)
        state = {"own": list(own), "model": dict(self.model.state_dict()),
                 "optimizer": _optimizer_state(self.optimizer), "sorter": self.sorter.state_dict(),
                 "driver": self.driver.state_dict(), "rng": _rng_state(),
                 "progress": dataclasses.asdict(progress), "history": history}
        checkpoint.save(self.cfg.checkpoint_dir, position, state, self.comm, meta=self._meta())
        return self.cfg.checkpoint_dir

    # ---------------------------------------------------------------- the loop
    def run(self) -> Dict[str, Any]:
        self._build()
        with self._locks():
            return self._run()

    def _steps(self, order: np.ndarray) -> int:
        steps = len(order) // (self.driver.batches_per_step * self.cfg.batch_size) or 1
        if self.driver.synchronous:  # every rank takes the smallest shard's count, so none waits forever
            steps = self.comm.allreduce(steps, op=_mpi_op("MIN"))
        return steps

    def _batches(self, order: np.ndarray, step: int) -> List[Batch]:
        k, b, dev = self.driver.batches_per_step, self.cfg.batch_size, self.rt.device
        out = []
        for j in range(k):
            idx = order[((step * k + j) * b) % len(order):][:b]
            x, y = self.train_data.get_batch(idx)
            out.append((x.to(dev), y.to(dev), idx))
        return out

    def _show_bar(self) -> bool:
        p = self.cfg.progress
        return self.rt.rank == 0 and (p == "on" or (p == "auto" and sys.stderr.isatty()))

    def _run(self) -> Dict[str, Any]:
        cfg, rt, driver = self.cfg, self.rt, self.driver
        (start_epoch, start_step), progress, history = self._resume()
        metrics = MetricsLog(cfg.metrics if rt.rank == 0 and driver.synchronous else None,
                             resume_epoch=start_epoch)
        rank_log = None
        if not driver.synchronous and cfg.metrics:  # gossip: every rank appends its own epochs as they end
            rank_log = MetricsLog(rank_path(cfg.metrics, rt.rank), resume_epoch=start_epoch, append_lines=True)
        if start_epoch >= cfg.epochs and rt.rank == 0:
            log.info("checkpoint is at epoch %d >= --epochs %d: nothing to do", start_epoch, cfg.epochs)
        t_start = time.perf_counter()
        steps_run = examples_run = 0
        own = (start_epoch, start_step)
        stopped = bad = False
        bad_at: Optional[Tuple[int, int]] = None
        record: Dict[str, Any] = {}
        epoch = start_epoch
        while epoch < cfg.epochs and not (stopped or bad):
            order = self.sorter.epoch_order()
            steps = self._steps(order)
            first = start_step if epoch == start_epoch else 0
            if epoch != start_epoch or first == 0:
                progress = EpochProgress(counters0=dict(driver.counters()))
            t0 = time.perf_counter() - progress.elapsed_s
            bar = _progress_bar(steps, first, epoch, cfg.epochs) if self._show_bar() else None
            step = first
            while step < steps:
                steps_run += 1
                faults.point("train.step")  # the one hook point: fault injection, then the straggler
                self.straggler.begin()  # loading the batches is part of the step's compute
                batches = self._batches(order, step)
                result = driver.step(batches, self.stop.requested)
                self.straggler.end(result.comm_s)
                examples_run += sum(len(b[1]) for b in batches)
                if result.local_bad and bad_at is None:
                    bad_at = (epoch, step)
                if result.bad:
                    bad = True
                    break
                progress.loss_sum += result.loss
                step += 1
                if bar is not None:
                    bar.update(1)
                if result.stop:
                    stopped = True
                    break
            if bar is not None:
                bar.close()
            progress.elapsed_s = time.perf_counter() - t0
            if bad or (stopped and step < steps):
                own = (epoch, step)
                break
            # the epoch is complete
            self.sorter.end_epoch()
            driver.end_epoch()
            record = self._end_epoch(epoch, steps, progress, metrics, history, rank_log)
            epoch += 1
            own = (epoch, 0)
            start_step = 0
            progress = EpochProgress(counters0=dict(driver.counters()))
            if (cfg.checkpoint_dir and driver.synchronous and not stopped and epoch < cfg.epochs
                    and epoch % cfg.checkpoint_every == 0):
                self._save(own, progress, history)
        return self._close(own, progress, history, metrics, record, stopped, bad, bad_at,
                           time.perf_counter() - t_start, examples_run)

    def _end_epoch(self, epoch: int, steps: int, progress: EpochProgress, metrics: MetricsLog,
                   history: List[Dict[str, Any]], rank_log: Optional[MetricsLog]) -> Dict[str, Any]:
        cfg, rt, comm, driver = self.cfg, self.rt, self.comm, self.driver
        counters = driver.counters()
        if not driver.synchronous:  # gossip: this rank's own record, no collective
            val = evaluate_local(self.model, self.val_data, cfg.batch_size, rt.device)
            rec = {"epoch": epoch + 1, "rank": rt.rank, "train_loss": progress.loss_sum / steps,
                   "val": val.tolist(), "epoch_time_s": progress.elapsed_s, "steps": steps,
                   **driver.epoch_local()}
            history.append(rec)
            if rank_log is not None:
                rank_log.append(rec)
            if rt.rank == 0:
                log.info("rank 0 epoch %d/%d: train_loss %.4f, own val_acc %.2f%%, %.2fs, staleness max %d",
                         epoch + 1, cfg.epochs, rec["train_loss"], 100 * val[1] / max(val[2], 1),
                         rec["epoch_time_s"], rec["stale"][2])
            return rec
        keys = sorted(counters)
        sums = comm.allreduce(np.array([progress.loss_sum / steps] +
                                       [counters[k] - progress.counters0.get(k, 0.0) for k in keys]))
        record = {"epoch": epoch + 1, "train_loss": float(sums[0]) / rt.size,
                  **evaluate(self.model, self.val_data, cfg.batch_size, rt.device, comm),
                  "epoch_time_s": float(comm.allreduce(progress.elapsed_s, op=_mpi_op("MAX"))),
                  **{k: int(v) for k, v in zip(keys, sums[1:])},
                  **driver.record_fields(steps), "ranks": rt.size, "config": self._config_label()}
        if rt.rank == 0:
            metrics.append(record)
            print(format_epoch(record, cfg.epochs), flush=True)
        return record

    def _close(self, own: Tuple[int, int], progress: EpochProgress, history: List[Dict[str, Any]],
               metrics: MetricsLog, record: Dict[str, Any], stopped: bool, bad: bool,
               bad_at: Optional[Tuple[int, int]], wall_s: float, examples: int) -> Dict[str, Any]:
        cfg, comm, driver = self.cfg, self.comm, self.driver
        driver.finish()  # gossip: serve until all ranks stopped, then drain (mass conserved)
        stopped = stopped and own[0] < cfg.epochs  # a stop after the very last step: the run is done
        bads = comm.allgather(bad_at)
        for r, at in enumerate(bads):
            if at is not None:
                raise UserError(f"non-finite loss or gradient on rank {r} at epoch {at[0] + 1} step {at[1] + 1}; "
                                f"stopped all ranks, nothing saved (lower --lr? check the data)", collective=True)
        if bad:  # agreed, but no rank remembers where: cannot happen; be safe
            raise UserError("non-finite loss or gradient; stopped all ranks, nothing saved", collective=True)
        signums = comm.allgather(self.stop.signum if stopped or self.stop.requested else None)
        stopped = any(s is not None for s in signums) and comm.allreduce(int(stopped), op=_mpi_op("MAX")) > 0
        if cfg.checkpoint_dir and (stopped or driver.synchronous or own[0] >= cfg.epochs):
            self._save(own, progress, history)
        if not driver.synchronous:
            record, metrics = self._report_gossip(history, metrics)
        if stopped:
            name = signal.Signals(next(s for s in signums if s is not None)).name
            pos = comm.allreduce(own[0] * 2 ** 32 + own[1], op=_mpi_op("MIN"))
            where = f"stopped by {name} at epoch {pos // 2 ** 32 + 1} step {pos % 2 ** 32}"
            if cfg.checkpoint_dir:
                raise Preempted(f"{where}; checkpoint in {cfg.checkpoint_dir}; continue with --resume",
                                EXIT_PREEMPTED)
            raise Preempted(f"{where}; no --checkpoint-dir, nothing saved", EXIT_INTERRUPTED)
        self._summary(metrics, wall_s, examples)
        return record

    def _summary(self, metrics: MetricsLog, wall_s: float, examples: int) -> None:
        """Rank 0: the final one-screen summary."""
        total = self.comm.allreduce(np.array([examples, self.driver.counters()["comm_bytes"]], dtype=np.float64))
        wall = self.comm.allreduce(wall_s, op=_mpi_op("MAX"))
        if self.rt.rank != 0:
            return
        recs = metrics.records
        best = max(recs, key=lambda r: r.get("val_acc", -1.0)) if recs else None
        lines = [f"summary: {self.cfg.epochs} epochs ({self.rt.size} ranks, --sync {self.cfg.sync}, "
                 f"--order {self.cfg.order}, --compress {self.cfg.compress}"
                 + (f", --gradalign-beta {self.cfg.gradalign_beta}" if self.cfg.gradalign_beta is not None else "")
                 + ")",
                 f"  time        {wall:.2f} s in this run, {total[0] / max(wall, 1e-9):.0f} examples/s "
                 f"({int(total[0])} examples)",
                 f"  bytes sent  {total[1] / 1e6:.2f} MB by all ranks (whole training)"]
        if best is not None:
            lines.append(f"  best val    {100 * best['val_acc']:.2f}% at epoch {best['epoch']}"
                         f" (last {100 * recs[-1]['val_acc']:.2f}%)")
        print("\n".join(lines), flush=True)

    def _report_gossip(self, history: List[Dict[str, Any]], metrics: MetricsLog) -> Tuple[Dict[str, Any], MetricsLog]:
        """Collective: the network-average and own-model evaluations, then rank 0 writes one record
        per epoch that every rank has completed (gathered once, so no rank waited while training)."""
        from hpc_dgrab.data import ShardDataset
        from hpc_dgrab.tensors import flat_params, set_flat_params

        cfg, rt, comm, driver = self.cfg, self.rt, self.comm, self.driver
        own_params = flat_params(self.model)
        set_flat_params(self.model, driver.average_model())
        avg_eval = evaluate(self.model, self.val_data, cfg.batch_size, rt.device, comm)
        set_flat_params(self.model, own_params)
        full_val = ShardDataset(self.val_data.root, 0, 1, split="val")
        own_full = evaluate_local(self.model, full_val, cfg.batch_size, rt.device)
        fs = driver.finish_stats
        summary = {"steps": driver.dasgd.steps, "weight": driver.dasgd.ps.w, "drain_s": driver.drain_s,
                   "own_val": own_full.tolist(), "served_pushes": fs.get("served_pushes", 0),
                   "straggler_idle_s": self.straggler.idle_s, "compute_s": fs.get("compute_s", 0.0),
                   "closing": fs.get("closing", [0, 0, 0]),
                   **{k: fs.get(k, 0) for k in GossipDriver.STAT_KEYS}}
        gathered = comm.gather((history, summary), root=0)
        record: Dict[str, Any] = {}
        if rt.rank == 0:
            per_rank = [g[0] for g in gathered]
            summaries = [g[1] for g in gathered]
            n = min(len(h) for h in per_rank)
            metrics = MetricsLog(cfg.metrics)
            for e in range(n):
                recs = [h[e] for h in per_rank]
                last = e == n - 1 and n == cfg.epochs
                if last:  # what arrived while serving and draining belongs to the last epoch
                    recs = [dict(r, stale=[r["stale"][0] + s["closing"][0], r["stale"][1] + s["closing"][1],
                                           max(r["stale"][2], s["closing"][2])],
                                 **{k: r[k] + s[k] for k in GossipDriver.STAT_KEYS})
                            for r, s in zip(recs, summaries)]
                record = _gossip_record(recs, rt.size, driver.topology.name)
                record["config"] = self._config_label()
                if last:
                    record.update({"avg_model_val_loss": avg_eval["val_loss"],
                                   "avg_model_val_acc": avg_eval["val_acc"],
                                   "own_model_val_acc_ranks": [_val_dict(s["own_val"])["val_acc"] for s in summaries],
                                   "own_model_val_loss_ranks": [_val_dict(s["own_val"])["val_loss"]
                                                                for s in summaries],
                                   "drain_s_ranks": [s["drain_s"] for s in summaries],
                                   "serving_pushes_ranks": [s["served_pushes"] for s in summaries],
                                   "straggler_idle_s_ranks": [s["straggler_idle_s"] for s in summaries],
                                   "compute_s_ranks": [s["compute_s"] for s in summaries],
                                   "final_weight_ranks": [s["weight"] for s in summaries]})
                metrics.append(record)
                print(format_epoch(record, cfg.epochs), flush=True)
            if n:
                print(f"average model: val_loss {avg_eval['val_loss']:.4f}  val_acc {100 * avg_eval['val_acc']:.2f}%  "
                      f"(own models: {', '.join('%.2f%%' % (100 * _val_dict(s['own_val'])['val_acc']) for s in summaries)})",
                      flush=True)
        return comm.bcast(record, root=0), metrics


def _gossip_record(recs: List[Dict[str, Any]], ranks: int, topology: str) -> Dict[str, Any]:
    """One epoch's record from every rank's own record of it."""
    val = np.sum([r["val"] for r in recs], axis=0)
    count, total = sum(r["stale"][0] for r in recs), sum(r["stale"][1] for r in recs)
    return {"epoch": recs[0]["epoch"], "train_loss": float(np.mean([r["train_loss"] for r in recs])),
            **_val_dict(val), "epoch_time_s": max(r["epoch_time_s"] for r in recs),
            "comm_bytes": int(sum(r["bytes_sent"] for r in recs)),
            "staleness_avg": total / count if count else 0.0,
            "staleness_max": int(max(r["stale"][2] for r in recs)),
            "messages": int(sum(r["messages_sent"] for r in recs)),
            "messages_received": int(sum(r["messages_received"] for r in recs)),
            "replacements": int(sum(r["replacements"] for r in recs)),
            "skipped_pushes": int(sum(r["skipped_pushes"] for r in recs)),
            "steps": int(sum(r["steps"] for r in recs)), "ranks": ranks, "topology": topology,
            "steps_ranks": [r["steps"] for r in recs],
            "epoch_time_s_ranks": [r["epoch_time_s"] for r in recs],
            "train_loss_ranks": [r["train_loss"] for r in recs],
            "staleness_max_ranks": [r["stale"][2] for r in recs],
            "weight_ranks": [r["weight"] for r in recs]}


def _progress_bar(total: int, initial: int, epoch: int, epochs: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False)
