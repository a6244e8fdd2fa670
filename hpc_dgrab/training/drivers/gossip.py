"""``GossipDriver``: DASGD over push-sum gossip (``--sync gossip --topology NAME``), or compressed
CHOCO gossip with ``--compress topk|regtopk --density D``, a thin wrapper over
:func:`hpc_dgrab.GossipOptimizer`, plus gossip's own epoch records and end-of-run report.

Ranks never wait for each other. Control flags: a non-blocking all-reduce (MAX of ``[stop,
non-finite]``) on its own communicator, one in flight; every step tests it and, once complete,
reads it and posts the next with this rank's current flags, so a rank learns of a stop within a few
of its own steps. Each rank counts its own steps per epoch and keeps its own epoch records
(``history``, appended to ``FILE.rank<R>`` as they end); :meth:`finish` serves and drains the gossip
(the push-sum mass is conserved) and retires the last control round; :meth:`report` evaluates the
network-average model and rank 0 writes one record per epoch every rank has completed.
"""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Sequence, cast

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from hpc_dgrab.metrics import MetricsLog, format_epoch, rank_path
from hpc_dgrab.training.drivers.base import Batch, Job, Record, Report, StepResult
from hpc_dgrab.training.evaluation import Totals, evaluate, evaluate_local
from hpc_dgrab.training.state import EpochProgress

if TYPE_CHECKING:
    from hpc_dgrab.comm.topology import Topology
    from hpc_dgrab.compress.base import Compressor
    from hpc_dgrab.optim.dasgd import StalenessMeter

log = logging.getLogger(__name__)

#: traffic counters of the gossip engine that a record holds per epoch
STAT_KEYS = ("messages_sent", "bytes_sent", "messages_received", "replacements", "skipped_pushes")


class GossipOptim(Protocol):
    """What the driver uses of :func:`hpc_dgrab.GossipOptimizer`'s object."""

    topology: Topology

    def zero_grad(self, set_to_none: bool = True) -> None: ...
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor: ...
    def is_finite(self) -> bool: ...
    def take_staleness_window(self) -> StalenessMeter: ...
    def stats(self) -> Dict[str, Any]: ...
    def finish(self) -> Dict[str, Any]: ...
    def average_model(self) -> None: ...
    def gossip_state_dict(self) -> Dict[str, Any]: ...
    def load_gossip_state_dict(self, state: Dict[str, Any]) -> None: ...
    @property
    def comm_s(self) -> float: ...
    @property
    def bytes_sent(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def weight(self) -> float: ...
    @property
    def finished(self) -> bool: ...


class GossipDriver:
    """One step: ``GossipOptimizer.step`` around the batch's forward/backward, then the control round."""

    batches_per_step = 1

    def __init__(self, job: Job, optimizer: torch.optim.Optimizer, topology: str,
                 compression: Optional[Compressor] = None) -> None:
        from hpc_dgrab.optim.gossip_optimizer import GossipOptimizer

        self.job, self.model, self.optimizer = job, job.model, optimizer   # the checkpoint's optimizer
        self.opt = cast(GossipOptim, GossipOptimizer(optimizer, job.model, topology=topology,
                                                     seed=job.cfg.seed, compression=compression))
        self._ctl_comm = job.comm.Dup()
        self._req: Optional[MPI.Request] = None
        self._ctl_rounds = 0
        self._ctl_recv = np.zeros(2, dtype=np.int32)
        self._ctl_send = np.zeros(2, dtype=np.int32)
        self._agreed = (False, False)
        self._epoch_stats = self.opt.stats()
        self._bytes_before = 0  # sent before a resume (by the engines of earlier runs)
        self._drain_s = 0.0
        self._finish_stats: Dict[str, Any] = {}
        self._rank_log: Optional[MetricsLog] = None

    # ---------------------------------------------------------------- steps
    def begin(self, start_epoch: int) -> None:
        if self.job.cfg.metrics:  # every rank appends its own epochs as they end
            self._rank_log = MetricsLog(rank_path(self.job.cfg.metrics, self.job.rank),
                                        resume_epoch=start_epoch, append_lines=True)

    def epoch_steps(self, own_steps: int) -> int:
        return own_steps  # ranks never wait: each takes its own shard's count

    def _post(self, stop: bool, bad: bool) -> None:
        self._ctl_send = np.array([int(stop), int(bad)], dtype=np.int32)
        self._ctl_recv = np.zeros(2, dtype=np.int32)
        self._req = self._ctl_comm.Iallreduce(self._ctl_send, self._ctl_recv, op=MPI.MAX)
        self._ctl_rounds += 1

    def step(self, batches: Sequence[Batch], stop: bool) -> StepResult:
        (x, y, _), = batches
        model, opt = self.model, self.opt

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            out = nn.functional.cross_entropy(model(x), y)
            out.backward()
            return out

        comm0 = opt.comm_s
        model.train()
        loss = float(opt.step(closure).detach())
        bad = not (math.isfinite(loss) and opt.is_finite())
        if self._req is None:
            self._post(stop, bad)
        elif self._req.Test():
            self._agreed = (self._agreed[0] or bool(self._ctl_recv[0]),
                            self._agreed[1] or bool(self._ctl_recv[1]))
            self._post(stop, bad)
        # no lock-step here: this rank stops at once on its own flag; the others learn it from a round
        return StepResult(loss, opt.comm_s - comm0, self._agreed[0] or stop, self._agreed[1] or bad, bad)

    def counters(self) -> Dict[str, float]:
        return {"comm_bytes": self.opt.bytes_sent + self._bytes_before}

    # ---------------------------------------------------------------- epochs: this rank's own records
    def epoch_record(self, epoch: int, steps: int, progress: EpochProgress, history: List[Record]) -> Record:
        """This rank's record of the epoch (no collective), kept in ``history``."""
        cfg = self.job.cfg
        val = evaluate_local(self.model, self.job.val_data, cfg.batch_size, self.job.device)
        window, after = self.opt.take_staleness_window(), self.opt.stats()
        rec = {"epoch": epoch + 1, "rank": self.job.rank, "train_loss": progress.loss_sum / steps,
               "val": val.as_list(), "epoch_time_s": progress.elapsed_s, "steps": steps,
               "stale": [window.count, window.total, window.max], "weight": self.opt.weight,
               **{k: after[k] - self._epoch_stats[k] for k in STAT_KEYS}}
        self._epoch_stats = after
        history.append(rec)
        return rec

    def end_epoch(self, record: Record) -> None:
        if self._rank_log is not None:
            self._rank_log.append(record)
        if self.job.rank == 0:
            val = Totals.of(record["val"])
            log.info("rank 0 epoch %d/%d: train_loss %.4f, own val_acc %.2f%%, %.2fs, staleness max %d",
                     record["epoch"], self.job.cfg.epochs, record["train_loss"],
                     100 * val.correct / max(val.count, 1), record["epoch_time_s"], record["stale"][2])

    def checkpoint_due(self, epochs_done: int) -> bool:
        return False  # a checkpoint is a barrier: gossip writes one at the end and when stopped

    # ---------------------------------------------------------------- the end
    def finish(self) -> None:
        """Collective: serve until all ranks stopped, then drain (mass conserved); retire the control."""
        if self.opt.finished:
            return
        t0 = time.perf_counter()
        before = self.opt.stats()
        stats = self.opt.finish()
        self._drain_s = time.perf_counter() - t0
        closing = self.opt.take_staleness_window()
        self._finish_stats = {"closing": [closing.count, closing.total, closing.max],
                              **{k: stats[k] - before[k] for k in STAT_KEYS},
                              "served_pushes": stats["served_pushes"], "compute_s": stats["compute_s"]}
        # every rank has one control round in flight or completed; bring them to the same count
        # (counted on the world communicator: the control one may still hold a round in flight)
        rounds = self.job.comm.allreduce(self._ctl_rounds, op=MPI.MAX)
        if self._req is not None:
            self._req.Wait()
        while self._ctl_rounds < rounds:
            self._post(False, False)
            assert self._req is not None
            self._req.Wait()
        self._ctl_comm.Free()

    def report(self, history: List[Record]) -> Report:
        """Collective: the network-average and own-model evaluations, then rank 0 writes one record
        per epoch that every rank has completed (gathered once, so no rank waited while training)."""
        from hpc_dgrab.data import ShardDataset
        from hpc_dgrab.tensors import flat_params, set_flat_params

        job, cfg = self.job, self.job.cfg
        own_params = flat_params(self.model)
        self.opt.average_model()
        avg_eval = evaluate(self.model, job.val_data, cfg.batch_size, job.device, job.comm)
        set_flat_params(self.model, own_params)
        full_val = ShardDataset(job.val_data.root, 0, 1, split="val")
        own_full = evaluate_local(self.model, full_val, cfg.batch_size, job.device)
        fs = self._finish_stats
        summary = {"steps": self.opt.steps, "weight": self.opt.weight, "drain_s": self._drain_s,
                   "own_val": own_full.as_list(), "served_pushes": fs.get("served_pushes", 0),
                   "straggler_idle_s": job.straggler.idle_s, "compute_s": fs.get("compute_s", 0.0),
                   "closing": fs.get("closing", [0, 0, 0]), **{k: fs.get(k, 0) for k in STAT_KEYS}}
        gathered = job.comm.gather((history, summary), root=0)
        record: Record = {}
        records: List[Record] = []
        if job.rank == 0:
            assert gathered is not None
            record, records = self._write(gathered, avg_eval)
        return Report(job.comm.bcast(record, root=0), records)

    def _write(self, gathered: List[Any], avg_eval: Dict[str, float]) -> Any:
        """Rank 0: one record per epoch every rank has completed, into ``--metrics``."""
        cfg = self.job.cfg
        per_rank = [g[0] for g in gathered]
        summaries = [g[1] for g in gathered]
        own = [Totals.of(s["own_val"]).metrics() for s in summaries]
        n = min(len(h) for h in per_rank)
        metrics = MetricsLog(cfg.metrics)
        record: Record = {}
        for e in range(n):
            recs = [h[e] for h in per_rank]
            last = e == n - 1 and n == cfg.epochs
            if last:  # what arrived while serving and draining belongs to the last epoch
                recs = [dict(r, stale=[r["stale"][0] + s["closing"][0], r["stale"][1] + s["closing"][1],
                                       max(r["stale"][2], s["closing"][2])],
                             **{k: r[k] + s[k] for k in STAT_KEYS})
                        for r, s in zip(recs, summaries)]
            record = epoch_record(recs, self.job.size, self.opt.topology.name)
            record["config"] = self.job.label()
            if last:
                record.update({"avg_model_val_loss": avg_eval["val_loss"],
                               "avg_model_val_acc": avg_eval["val_acc"],
                               "own_model_val_acc_ranks": [o["val_acc"] for o in own],
                               "own_model_val_loss_ranks": [o["val_loss"] for o in own],
                               "drain_s_ranks": [s["drain_s"] for s in summaries],
                               "serving_pushes_ranks": [s["served_pushes"] for s in summaries],
                               "straggler_idle_s_ranks": [s["straggler_idle_s"] for s in summaries],
                               "compute_s_ranks": [s["compute_s"] for s in summaries],
                               "final_weight_ranks": [s["weight"] for s in summaries]})
            metrics.append(record)
            print(format_epoch(record, cfg.epochs), flush=True)
        if n:
            print(f"average model: val_loss {avg_eval['val_loss']:.4f}  "
                  f"val_acc {100 * avg_eval['val_acc']:.2f}%  "
                  f"(own models: {', '.join('%.2f%%' % (100 * o['val_acc']) for o in own)})", flush=True)
        return record, metrics.records

    # ---------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return {**self.opt.gossip_state_dict(), "bytes_sent": int(self.counters()["comm_bytes"])}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.opt.load_gossip_state_dict({k: v for k, v in state.items() if k != "bytes_sent"})
        self._bytes_before = int(state.get("bytes_sent", 0))


def epoch_record(recs: List[Record], ranks: int, topology: str) -> Record:
    """One epoch's record from every rank's own record of it."""
    val = Totals.of(np.sum([r["val"] for r in recs], axis=0))
    count, total = sum(r["stale"][0] for r in recs), sum(r["stale"][1] for r in recs)
    return {"epoch": recs[0]["epoch"], "train_loss": float(np.mean([r["train_loss"] for r in recs])),
            **val.metrics(), "epoch_time_s": max(r["epoch_time_s"] for r in recs),
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
