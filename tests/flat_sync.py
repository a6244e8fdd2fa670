"""The flat reference that tests check DistributedOptimizer (and GradAlign) against: backward (or a
sorter's balance step), ONE ``GradientExchange.mean_`` of the whole flat gradient with the sorter's
payload in the same message, the optimizer's step. Not part of the library (users and the trainer
run DistributedOptimizer)."""
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from hpc_dgrab.compress import GradientExchange
from hpc_dgrab.tensors import flat_grad, set_flat_grad


def transport(comm: Any = None) -> Any:
    """A transport over ``comm`` (default the world); ``"self"``: this process alone."""
    from mpi4py import MPI

    from hpc_dgrab.comm import get_transport

    return get_transport("mpi", MPI.COMM_SELF if comm == "self" else comm)


class FlatSync:
    """Synchronous SGD through one flat exchange per step; ``order_bytes`` counts the payloads."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 exchange: GradientExchange) -> None:
        self.model, self.optimizer, self.loss_fn, self.exchange = model, optimizer, loss_fn, exchange
        self.order_bytes = 0

    @property
    def bytes_sent(self) -> int:
        return self.exchange.bytes_sent

    def step(self, x: torch.Tensor, y: torch.Tensor, sorter: Optional[Any] = None,
             indices: Optional[np.ndarray] = None) -> float:
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
        grad = grad.clone()
        payload_sum = self.exchange.mean_(grad, payload)
        if sorter is not None and sorter.needs_grads:
            sorter.apply_payload(payload_sum)
        set_flat_grad(self.model, grad)
        self.optimizer.step()
        return float(loss.detach())
