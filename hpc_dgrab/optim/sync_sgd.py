"""Synchronous data-parallel SGD, the flat reference: backward, ONE exchange of the whole gradient, step.

The trainer and users run :class:`hpc_dgrab.optim.distributed.DistributedOptimizer` (buckets
all-reduced during backward); this driver is the plain reference the tests check it against
("bucketed equals one flat all-reduce") and a baseline of the benchmarks. The gradient exchange is a small object (an *exchanger*) so that the same driver runs dense
all-reduce (MPI or Horovod), sparse all-gather with compression, and carries a method's extra
payload (D-GraB's signed differences) in the same message as the gradient.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Protocol, Tuple

import numpy as np
import torch
from torch import nn

from hpc_dgrab.tensors import flat_grad, set_flat_grad

log = logging.getLogger(__name__)


class Exchanger(Protocol):
    """Averages a flat gradient across ranks; sums an optional extra payload in the same message."""

    bytes_sent: int

    def exchange(self, grad: torch.Tensor,
                 extra: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        ...


class DenseExchanger:
    """One all-reduce of ``[gradient | extra]``: returns (mean gradient, sum of extras).

    ``allreduce_`` is an in-place sum (a backend's ``allreduce_``); ``bytes_sent`` counts the payload
    this rank hands to it (the buffer size, once per call).
    """

    def __init__(self, allreduce_: Callable[[torch.Tensor], Any], world_size: int) -> None:
        self._allreduce_ = allreduce_
        self.world_size = world_size
        self.bytes_sent = 0

    def exchange(self, grad: torch.Tensor,
                 extra: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        d = grad.numel()
        buf = torch.cat([grad.reshape(-1), extra.reshape(-1).to(grad.dtype)]) if extra is not None \
            else grad.reshape(-1).clone()
        self._allreduce_(buf)
        self.bytes_sent += buf.numel() * buf.element_size()
        mean = buf[:d].div_(self.world_size).view_as(grad)
        return mean, (buf[d:] if extra is not None else None)

    def state_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent}

    def load_state_dict(self, state: dict) -> None:
        self.bytes_sent = int(state.get("bytes_sent", 0))


class SyncSGD:
    """Synchronous SGD driver: local gradient, exchange (average), optimizer step — on 1 rank or N.

    With a sorter that ``needs_grads`` (GraB, PairBalance, D-GraB; :mod:`hpc_dgrab.order`) the sorter
    computes the step's gradient from its balancing units, so no second backward pass, and its
    payload (``sorter.balance_step(model, loss_fn, x, y, indices) -> (loss, flat_grad, payload)``;
    payload None = nothing to send); the payload rides in the same exchange as the gradient and the
    sorter is handed its sum over ranks afterwards (``sorter.apply_payload(payload_sum)``).
    ``order_bytes`` counts the payload bytes this rank sent (in the gradient's dtype).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 exchanger: Exchanger) -> None:
        self.model, self.optimizer, self.loss_fn, self.exchanger = model, optimizer, loss_fn, exchanger
        self.order_bytes = 0

    def step(self, x: torch.Tensor, y: torch.Tensor, sorter: Optional[Any] = None,
             indices: Optional[np.ndarray] = None) -> float:
        """One synchronous step on this rank's batch; returns this rank's batch loss."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        if sorter is not None and sorter.needs_grads:
            loss, grad, payload = sorter.balance_step(self.model, self.loss_fn, x, y, indices)
        else:
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            grad, payload = flat_grad(self.model), None
        if payload is not None:
            self.order_bytes += payload.numel() * grad.element_size()
        mean, payload_sum = self.exchanger.exchange(grad, payload)
        if sorter is not None and sorter.needs_grads:
            sorter.apply_payload(payload_sum)
        set_flat_grad(self.model, mean)
        self.optimizer.step()
        return float(loss.detach())
