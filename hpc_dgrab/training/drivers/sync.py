"""``SyncDriver``: synchronous SGD (``--sync allreduce|horovod``, any ``--order``, ``--compress``) over
:func:`hpc_dgrab.DistributedOptimizer` and :class:`hpc_dgrab.OrderedSampler`.

The control vector ``[stop, non-finite loss]`` is one more payload, so it rides in the same message
as the gradient. A step whose summed control says non-finite, or whose mean gradient (the same on
every rank) is not finite, is not applied. ``order_bytes`` counts the sampler's order data.
"""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Optional, Protocol, Sequence, cast

import torch
from torch import nn

from hpc_dgrab.training.drivers.base import Batch, Job, Record, StepResult, finite
from hpc_dgrab.training.drivers.lockstep import Lockstep

if TYPE_CHECKING:
    from hpc_dgrab.compress import Compressor
    from hpc_dgrab.optim.sampler import OrderedSampler

log = logging.getLogger(__name__)


class SyncOptim(Protocol):
    """What the driver uses of :func:`hpc_dgrab.DistributedOptimizer`'s object."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...
    def add_payload(self, tensor: torch.Tensor,
                    on_result: Optional[Callable[[torch.Tensor], Any]] = None) -> Any: ...
    def synchronize(self) -> None: ...
    def skip_synchronize(self) -> ContextManager[None]: ...
    def step(self) -> Any: ...
    @property
    def bytes_sent(self) -> int: ...


class SyncDriver(Lockstep):
    """One step: the sampler's forward/backward, the control payload, ``synchronize``, ``step``."""

    batches_per_step = 1

    def __init__(self, job: Job, optimizer: torch.optim.Optimizer, sampler: OrderedSampler,
                 compression: Optional[Compressor], backend: str) -> None:
        from hpc_dgrab.optim.distributed import DistributedOptimizer

        self.job, self.model, self.sampler = job, job.model, sampler
        self.optimizer = DistributedOptimizer(optimizer, named_parameters=job.model.named_parameters(),
                                              compression=compression, backend=backend, sampler=sampler)
        self.opt = cast(SyncOptim, self.optimizer)

    def step(self, batches: Sequence[Batch], stop: bool) -> StepResult:
        (x, y, idx), = batches
        opt = self.opt
        self.model.train()
        opt.zero_grad()
        loss = float(self.sampler.backward(self.model, nn.functional.cross_entropy, x, y,
                                           indices=cast(Sequence[int], idx)))
        local_bad = not math.isfinite(loss)
        control = opt.add_payload(torch.tensor([float(stop), float(local_bad)]))
        t0 = time.perf_counter()
        opt.synchronize()
        comm_s = time.perf_counter() - t0
        bad = bool(control.value[1] > 0) or not finite(*(p.grad for p in self.model.parameters()
                                                         if p.grad is not None))
        if bad:
            opt.zero_grad()
        else:
            with opt.skip_synchronize():
                opt.step()
        return StepResult(loss, comm_s, bool(control.value[0] > 0), bad, local_bad)

    def counters(self) -> Dict[str, float]:
        return {"comm_bytes": self.opt.bytes_sent, "order_bytes": self.sampler.payload_bytes}

    def record_fields(self, steps: int) -> Record:
        return {"steps": steps}

    def state_dict(self) -> Dict[str, Any]:
        # the optimizer (with compression memory) is saved as the checkpoint's optimizer
        return {"order_bytes": self.sampler.payload_bytes}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.payload_bytes = int(state.get("order_bytes", 0))
