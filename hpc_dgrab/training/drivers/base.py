"""The one interface between the training loop and a method: :class:`Driver`.

A driver owns one step of one method and everything about it that differs between methods: how
many steps an epoch has, how an epoch's numbers are aggregated and reported, when a checkpoint may
be written, how the run ends, and its own checkpoint state. The loop calls, per run::

    begin(start_epoch)
    per epoch:  epoch_steps(own_steps);  per step: step(batches, stop) -> StepResult
                (epoch complete:) record = epoch_record(epoch, steps, progress, history);
                end_epoch(record);  checkpoint_due(epochs_done)
    finish();  report(history) -> Report

``step`` receives ``batches_per_step`` batches and whether this rank wants to stop. A driver whose
ranks step together returns the same ``stop`` / ``bad`` on every rank at the same step; the gossip
driver lets each rank stop at its own step. ``counters()`` are cumulative per-rank numbers (bytes
sent, ...). ``optimizer`` is the optimizer whose state a checkpoint holds.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Dict, List, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from hpc_dgrab.training.config import TrainConfig

if TYPE_CHECKING:
    from mpi4py import MPI

    from hpc_dgrab.data import ShardDataset
    from hpc_dgrab.optim.straggler import Straggler
    from hpc_dgrab.training.state import EpochProgress

log = logging.getLogger(__name__)

#: one batch: inputs, labels and the examples' indices in this rank's shard
Batch = Tuple[torch.Tensor, torch.Tensor, np.ndarray]
Record = Dict[str, Any]


@dataclasses.dataclass
class StepResult:
    """What a driver's step tells the loop. ``stop`` / ``bad``: some rank wants to stop / saw a
    non-finite number; ``local_bad``: this rank saw it."""

    loss: float          # this rank's mean loss of the step
    comm_s: float        # seconds of the step spent communicating (not compute, for --straggler)
    stop: bool = False
    bad: bool = False
    local_bad: bool = False


@dataclasses.dataclass
class Report:
    """The end of a run: the last epoch's record (the same on every rank) and, on rank 0, every
    epoch's record (for the summary)."""

    last: Record
    records: List[Record]


@dataclasses.dataclass
class Job:
    """What every driver is built with: the settings, this rank's place, model and data."""

    cfg: TrainConfig
    comm: MPI.Comm
    rank: int
    size: int
    device: str
    model: nn.Module
    val_data: ShardDataset
    straggler: Straggler

    def label(self) -> Record:
        """The run's settings in every metrics record."""
        return self.cfg.label(self.size)


class Driver(Protocol):
    """One method's step and its epoch, end and state (see the module docstring)."""

    batches_per_step: int
    optimizer: torch.optim.Optimizer

    def begin(self, start_epoch: int) -> None: ...

    def epoch_steps(self, own_steps: int) -> int: ...

    def step(self, batches: Sequence[Batch], stop: bool) -> StepResult: ...

    def counters(self) -> Dict[str, float]: ...

    def epoch_record(self, epoch: int, steps: int, progress: EpochProgress,
                     history: List[Record]) -> Record: ...

    def end_epoch(self, record: Record) -> None: ...

    def checkpoint_due(self, epochs_done: int) -> bool: ...

    def finish(self) -> None: ...

    def report(self, history: List[Record]) -> Report: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


def finite(*tensors: torch.Tensor) -> bool:
    """Whether every tensor holds only finite numbers."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)
