"""``GradAlignDriver``: GradAlign / local SGD (``--gradalign-beta``) over :class:`hpc_dgrab.GradAlign`.

One step is one round of ``--local-steps`` batches; the control flags ``[stop, non-finite]`` take
one extra 2-number all-reduce per round (counted in ``comm_bytes``).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, Sequence

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from hpc_dgrab.comm.transport import Collectives
from hpc_dgrab.training.drivers.base import Batch, Job, Record, StepResult, finite
from hpc_dgrab.training.drivers.lockstep import Lockstep

log = logging.getLogger(__name__)


class GradAlignDriver(Lockstep):
    """One step = one GradAlign round, then the control all-reduce."""

    def __init__(self, job: Job, optimizer: torch.optim.Optimizer, beta: float, local_steps: int,
                 transport: Collectives) -> None:
        from hpc_dgrab.optim.gradalign import GradAlign

        self.job, self.model, self.optimizer, self.beta = job, job.model, optimizer, beta
        self.ga = GradAlign(job.model, optimizer, nn.functional.cross_entropy, beta, local_steps,
                            transport=transport)
        self.batches_per_step = local_steps
        self.control_bytes = 0

    def step(self, batches: Sequence[Batch], stop: bool) -> StepResult:
        comm0 = self.ga.comm_s
        loss = self.ga.round([(x, y) for x, y, _ in batches])
        bad = not (math.isfinite(loss) and finite(*self.model.parameters()))
        t0 = time.perf_counter()
        flags = np.array([int(stop), int(bad)], dtype=np.int32)
        self.job.comm.Allreduce(flags.copy(), flags, op=MPI.MAX)
        self.control_bytes += flags.nbytes
        comm_s = self.ga.comm_s - comm0 + time.perf_counter() - t0
        return StepResult(loss, comm_s, bool(flags[0]), bool(flags[1]), bad)

    def counters(self) -> Dict[str, float]:
        return {"comm_bytes": self.ga.bytes_sent + self.control_bytes}

    def record_fields(self, steps: int) -> Record:
        return {"steps": steps * self.batches_per_step, "rounds": steps, "local_steps": self.batches_per_step,
                "gradalign_beta": self.beta}

    def state_dict(self) -> Dict[str, Any]:
        return {"gradalign": self.ga.state_dict(), "control_bytes": self.control_bytes}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.ga.load_state_dict(state["gradalign"])
        self.control_bytes = int(state.get("control_bytes", 0))
