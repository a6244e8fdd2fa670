"""The one training loop of ``python -m hpc_dgrab.train``: :class:`Trainer` over a driver.

The loop owns what is the same for every method: the data (each rank its own shard), the example
order (an :class:`~hpc_dgrab.OrderedSampler`), resume and checkpoints, metrics, progress, the one
hook point (fault injection, then ``--straggler``), stopping and failure handling. What differs
between methods is behind :class:`~hpc_dgrab.training.drivers.base.Driver`.

Stopping: SIGTERM / SIGUSR1 set a flag (:mod:`~hpc_dgrab.training.signals`); the driver tells every
rank at a step boundary; the job drains, writes a checkpoint of the running epoch, and raises
:class:`~hpc_dgrab.training.signals.Preempted` (exit 75 with ``--checkpoint-dir``, else 130). A
signal after the last step of the last epoch lets the run finish. A non-finite loss or gradient
on any rank stops all ranks at once; nothing is written and every rank raises one collective
:class:`~hpc_dgrab.errors.UserError` naming the lowest such rank and its step. The fault-injection
point is ``train.step``, marked before every step (:mod:`hpc_dgrab.faults`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Any, Iterator, List, Optional

import numpy as np
import torch
from mpi4py import MPI

from hpc_dgrab import faults, locks, runtime
from hpc_dgrab.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError, agree
from hpc_dgrab.training import state
from hpc_dgrab.training.combinations import combination_problem
from hpc_dgrab.training.config import TrainConfig
from hpc_dgrab.training.data import open_data
from hpc_dgrab.training.drivers import Job, make_driver
from hpc_dgrab.training.drivers.base import Batch, Driver, Record, Report
from hpc_dgrab.training.signals import STOP, Preempted, StopFlag
from hpc_dgrab.training.state import Cursor, EpochProgress

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Outcome:
    """How the loop ended on this rank."""

    own: Cursor
    progress: EpochProgress
    stopped: bool = False
    bad: bool = False
    bad_at: Optional[Cursor] = None
    examples: int = 0


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

    def run(self) -> Record:
        self._build()
        with self._locks():
            return self._run()

    # ---------------------------------------------------------------- building
    def _build(self) -> None:
        from hpc_dgrab import api
        from hpc_dgrab.models import build_model
        from hpc_dgrab.optim.sampler import OrderedSampler
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
        straggler = Straggler.for_rank(spec, rt.rank)
        self.train_data, val_data = open_data(cfg, rt, comm)
        try:
            model = build_model(cfg.model, self.train_data.input_shape, self.train_data.num_classes,
                                seed=cfg.seed)
            # the order's settings and the model checked where every rank fails alike
            make_sorter(cfg.order, len(self.train_data), seed=cfg.seed, rank=rt.rank, world_size=rt.size,
                        mode=cfg.dgrab_mode, units=cfg.order_units,
                        payload=cfg.dgrab_payload).check_model(model)
        except ValueError as exc:
            raise UserError(str(exc), collective=True) from None
        model.to(rt.device)
        api.init(comm)
        self.sampler = OrderedSampler(len(self.train_data), order=cfg.order, seed=cfg.seed,
                                      mode=cfg.dgrab_mode, units=cfg.order_units, payload=cfg.dgrab_payload)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        self.job = Job(cfg, comm, rt.rank, rt.size, rt.device, model, val_data, straggler)
        self.driver: Driver = make_driver(self.job, optimizer, self.sampler)
        self.parts = state.Parts(model, self.driver.optimizer, self.sampler, self.driver)

    @contextlib.contextmanager
    def _locks(self) -> Iterator[None]:
        """Every output is writable (else one line on every rank, before the first step); rank 0
        holds the checkpoint directory and the metrics file for the whole job."""
        from hpc_dgrab.fileio import output_problem
        from hpc_dgrab.metrics import rank_path

        with contextlib.ExitStack() as stack:
            cfg = self.cfg
            problem = None
            if cfg.metrics and (self.rt.rank == 0 or cfg.sync == "gossip"):
                problem = output_problem(cfg.metrics, "--metrics")
                if problem is None and cfg.sync == "gossip":   # every rank appends its own file
                    problem = output_problem(rank_path(cfg.metrics, self.rt.rank), "--metrics (per rank)")
            if problem is None and cfg.checkpoint_dir and self.rt.rank == 0:
                problem = output_problem(cfg.checkpoint_dir, "--checkpoint-dir", directory=True)
            if self.rt.rank == 0 and problem is None:
                try:
                    if self.cfg.checkpoint_dir:
                        os.makedirs(self.cfg.checkpoint_dir, exist_ok=True)
                        stack.enter_context(locks.hold(self.cfg.checkpoint_dir, "--checkpoint-dir",
                                                       directory=True))
                    if self.cfg.metrics:
                        stack.enter_context(locks.hold(self.cfg.metrics, "--metrics", directory=False))
                except (UserError, OSError) as exc:
                    problem = str(exc)
            agree(problem, self.comm)
            yield

    # ---------------------------------------------------------------- the loop
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

    def _run(self) -> Record:
        cfg, driver = self.cfg, self.driver
        start = state.resume(cfg, self.comm, self.parts)
        history, progress = start.history, start.progress
        driver.begin(start.cursor.epoch)
        if start.cursor.epoch >= cfg.epochs and self.rt.rank == 0:
            log.info("checkpoint is at epoch %d >= --epochs %d: nothing to do", start.cursor.epoch,
                     cfg.epochs)
        t_start = time.perf_counter()
        out = Outcome(start.cursor, progress)
        epoch = start.cursor.epoch
        while epoch < cfg.epochs and not (out.stopped or out.bad):
            order = self.sampler.order()
            steps = driver.epoch_steps(len(order) // (driver.batches_per_step * cfg.batch_size) or 1)
            first = start.cursor.step if epoch == start.cursor.epoch else 0
            if first == 0:
                progress = EpochProgress(counters0=dict(driver.counters()))
            step = self._epoch(epoch, first, steps, order, progress, out)
            if out.bad or (out.stopped and step < steps):
                out.own, out.progress = Cursor(epoch, step), progress
                break
            # the epoch is complete
            self.sampler.set_epoch(self.sampler.epoch + 1)
            driver.end_epoch(driver.epoch_record(epoch, steps, progress, history))
            epoch += 1
            progress = EpochProgress(counters0=dict(driver.counters()))
            out.own, out.progress = Cursor(epoch, 0), progress
            if cfg.checkpoint_dir and not out.stopped and epoch < cfg.epochs and driver.checkpoint_due(epoch):
                state.save(cfg, self.comm, out.own, progress, history, self.parts)
        return self._close(out, history, time.perf_counter() - t_start)

    def _epoch(self, epoch: int, first: int, steps: int, order: np.ndarray, progress: EpochProgress,
               out: Outcome) -> int:
        """Steps ``first..steps-1`` of ``epoch`` (fewer when stopped or bad); returns the next step."""
        t0 = time.perf_counter() - progress.elapsed_s
        bar = _progress_bar(steps, first, epoch, self.cfg.epochs) if self._show_bar() else None
        step = first
        while step < steps:
            faults.point("train.step")  # the one hook point: fault injection, then the straggler
            self.job.straggler.begin()  # loading the batches is part of the step's compute
            batches = self._batches(order, step)
            result = self.driver.step(batches, self.stop.requested)
            self.job.straggler.end(result.comm_s)
            out.examples += sum(len(b[1]) for b in batches)
            if result.local_bad and out.bad_at is None:
                out.bad_at = Cursor(epoch, step)
            if result.bad:
                out.bad = True
                break
            progress.loss_sum += result.loss
            step += 1
            if bar is not None:
                bar.update(1)
            if result.stop:
                out.stopped = True
                break
        if bar is not None:
            bar.close()
        progress.elapsed_s = time.perf_counter() - t0
        return step

    # ---------------------------------------------------------------- the end
    def _close(self, out: Outcome, history: List[Record], wall_s: float) -> Record:
        cfg, comm = self.cfg, self.comm
        self.driver.finish()
        # a stop after the very last step: the run is done
        stopped = out.stopped and out.own.epoch < cfg.epochs
        for r, at in enumerate(comm.allgather(out.bad_at)):
            if at is not None:
                raise UserError(f"non-finite loss or gradient on rank {r} at epoch {at.epoch + 1} step "
                                f"{at.step + 1}; stopped all ranks, nothing saved "
                                "(lower --lr? check the data)", collective=True)
        if out.bad:  # agreed, but no rank remembers where: cannot happen; be safe
            raise UserError("non-finite loss or gradient; stopped all ranks, nothing saved", collective=True)
        signums = comm.allgather(self.stop.signum if stopped or self.stop.requested else None)
        stopped = any(s is not None for s in signums) and comm.allreduce(int(stopped), op=MPI.MAX) > 0
        if cfg.checkpoint_dir:
            state.save(cfg, comm, out.own, out.progress, history, self.parts)
        report = self.driver.report(history)
        if stopped:
            name = signal.Signals(next(s for s in signums if s is not None)).name
            pos = Cursor.of_key(comm.allreduce(out.own.key(), op=MPI.MIN))
            where = f"stopped by {name} at epoch {pos.epoch + 1} step {pos.step}"
            if cfg.checkpoint_dir:
                raise Preempted(f"{where}; checkpoint in {cfg.checkpoint_dir}; continue with --resume",
                                EXIT_PREEMPTED)
            raise Preempted(f"{where}; no --checkpoint-dir, nothing saved", EXIT_INTERRUPTED)
        self._summary(report, wall_s, out.examples)
        return report.last

    def _summary(self, report: Report, wall_s: float, examples: int) -> None:
        """Rank 0: the final one-screen summary."""
        cfg = self.cfg
        total = self.comm.allreduce(np.array([examples, self.driver.counters()["comm_bytes"]],
                                             dtype=np.float64))
        wall = self.comm.allreduce(wall_s, op=MPI.MAX)
        if self.rt.rank != 0:
            return
        recs = report.records
        best = max(recs, key=lambda r: r.get("val_acc", -1.0)) if recs else None
        lines = [f"summary: {cfg.epochs} epochs ({self.rt.size} ranks, --sync {cfg.sync}, "
                 f"--order {cfg.order}, --compress {cfg.compress}"
                 + ("" if cfg.gradalign_beta is None else f", --gradalign-beta {cfg.gradalign_beta}") + ")",
                 f"  time        {wall:.2f} s in this run, {total[0] / max(wall, 1e-9):.0f} examples/s "
                 f"({int(total[0])} examples)",
                 f"  bytes sent  {total[1] / 1e6:.2f} MB by all ranks (whole training)"]
        if best is not None:
            lines.append(f"  best val    {100 * best['val_acc']:.2f}% at epoch {best['epoch']}"
                         f" (last {100 * recs[-1]['val_acc']:.2f}%)")
        print("\n".join(lines), flush=True)


def _progress_bar(total: int, initial: int, epoch: int, epochs: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False)
