"""What the drivers whose ranks step together share: every epoch has the smallest shard's step
count, an epoch's record is aggregated collectively (rank 0 writes it), a checkpoint may be
written after any epoch."""
from __future__ import annotations

import abc
import logging
from typing import Dict, List, Optional

import numpy as np
from mpi4py import MPI

from hpc_dgrab.metrics import MetricsLog, format_epoch
from hpc_dgrab.training.drivers.base import Job, Record, Report
from hpc_dgrab.training.evaluation import evaluate
from hpc_dgrab.training.state import EpochProgress

log = logging.getLogger(__name__)


class Lockstep(abc.ABC):
    """Base of :class:`SyncDriver` and :class:`GradAlignDriver`: needs ``job``, ``counters()`` and
    ``record_fields(steps)``."""

    job: Job
    _metrics: Optional[MetricsLog] = None

    @abc.abstractmethod
    def counters(self) -> Dict[str, float]:
        """Cumulative per-rank numbers (``comm_bytes``, ...), summed over ranks per epoch."""

    @abc.abstractmethod
    def record_fields(self, steps: int) -> Record:
        """The driver's own fields of an epoch's record."""

    def begin(self, start_epoch: int) -> None:
        path = self.job.cfg.metrics if self.job.rank == 0 else None
        self._metrics = MetricsLog(path, resume_epoch=start_epoch)
        self._last: Record = {}

    def epoch_steps(self, own_steps: int) -> int:
        """Every rank takes the smallest shard's count, so none waits forever."""
        return int(self.job.comm.allreduce(own_steps, op=MPI.MIN))

    def epoch_record(self, epoch: int, steps: int, progress: EpochProgress, history: List[Record]) -> Record:
        """Collective: the epoch's record, the same on every rank."""
        job, counters = self.job, self.counters()
        keys = sorted(counters)
        sums = job.comm.allreduce(np.array([progress.loss_sum / steps] +
                                           [counters[k] - progress.counters0.get(k, 0.0) for k in keys]))
        cfg = job.cfg
        return {"epoch": epoch + 1, "train_loss": float(sums[0]) / job.size,
                **evaluate(job.model, job.val_data, cfg.batch_size, job.device, job.comm),
                "epoch_time_s": float(job.comm.allreduce(progress.elapsed_s, op=MPI.MAX)),
                **{k: int(v) for k, v in zip(keys, sums[1:])},
                **self.record_fields(steps), "ranks": job.size, "config": job.label()}

    def end_epoch(self, record: Record) -> None:
        self._last = record
        if self.job.rank == 0:
            assert self._metrics is not None
            self._metrics.append(record)
            print(format_epoch(record, self.job.cfg.epochs), flush=True)

    def checkpoint_due(self, epochs_done: int) -> bool:
        return epochs_done % self.job.cfg.checkpoint_every == 0

    def finish(self) -> None:  # noqa: B027 - nothing in flight between steps
        pass

    def report(self, history: List[Record]) -> Report:
        return Report(self._last, self._metrics.records if self._metrics is not None else [])

