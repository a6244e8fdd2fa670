"""GradAlign: large-batch distributed / federated SGD that keeps SGD's gradient-alignment regulariser.

One *round* on every rank ``i``, weights ``n_i`` = the number of examples rank ``i`` uses in it::

    g_i  = grad f_i(x)   on all of the round's examples of rank i     (skipped when beta == 0)
    gbar = sum_i n_i g_i / sum_i n_i                                   (weighted mean #1)
    x_i  = x - beta * (gbar - g_i)                                     (the displacement)
    K times:  x_i <- optimizer step on grad f_i(x_i; batch k)          (K = local_steps)
    xbar = sum_i n_i x_i / sum_i n_i                                   (weighted mean #2)
    x   <- x - lr_server * (x - xbar)                                  (lr_server = 1: x <- xbar)

``beta = 0, K = 1`` is one step of large-batch SGD on the union of the ranks' batches; ``K > 1`` is
local SGD / FedAvg. The weighted means go through a dense
:class:`~hpc_dgrab.compress.GradientExchange`; :func:`displace` and :func:`server_step` are the
pure numerics.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from hpc_dgrab.comm.transport import Collectives
from hpc_dgrab.compress.exchange import GradientExchange
from hpc_dgrab.tensors import flat_grad, flat_params, set_flat_params

log = logging.getLogger(__name__)

Batch = Tuple[torch.Tensor, torch.Tensor]


def displace(x: torch.Tensor, g_i: torch.Tensor, gbar: torch.Tensor, beta: float) -> torch.Tensor:
    """The GradAlign start point of rank i: ``x - beta * (gbar - g_i)`` (a new tensor)."""
    return x - beta * (gbar - g_i)


def server_step(x: torch.Tensor, xbar: torch.Tensor, lr_server: float = 1.0) -> torch.Tensor:
    """``x - lr_server * (x - xbar)``; exactly ``xbar`` (a copy) when ``lr_server == 1``."""
    if lr_server == 1.0:
        return xbar.clone()
    return x - lr_server * (x - xbar)


class GradAlign:
    """GradAlign driver: ``round(batches)`` runs one round (module docstring) on this rank.

    ``optimizer`` takes the K local steps (plain SGD for the method as published; its momentum
    buffers persist across rounds on every rank). ``transport``: the ranks to average over
    (default: an MPI transport over the world). ``bytes_sent`` counts the payload this rank hands
    to the transport, ``comm_s`` the seconds spent in the weighted means.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], beta: float,
                 local_steps: int = 1, lr_server: float = 1.0,
                 transport: Optional[Collectives] = None) -> None:
        if beta < 0:
            raise ValueError(f"GradAlign: beta must be >= 0, got {beta}")
        if local_steps < 1:
            raise ValueError(f"GradAlign: local_steps must be >= 1, got {local_steps}")
        if lr_server <= 0:
            raise ValueError(f"GradAlign: lr_server must be > 0, got {lr_server}")
        if transport is None:
            from hpc_dgrab.comm import get_transport

            transport = get_transport("mpi")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.beta, self.local_steps, self.lr_server = float(beta), int(local_steps), float(lr_server)
        self.exchange = GradientExchange(transport)
        self.rounds = 0
        self.comm_s = 0.0
        self.last_displacement_norm = 0.0

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this rank handed to the transport (cumulative)."""
        return self.exchange.bytes_sent

    def _reduce_mean(self, vec: torch.Tensor, count: float) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.exchange.weighted_mean(vec, count)
        finally:
            self.comm_s += time.perf_counter() - t0

    def full_gradient(self, batches: Sequence[Batch]) -> Tuple[torch.Tensor, float]:
        """Mean gradient (flat) and mean loss over all examples of ``batches``, at the current model."""
        self.model.train()
        self.model.zero_grad(set_to_none=False)
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        grad = flat_grad(self.model)
        self.model.zero_grad(set_to_none=False)
        return grad, float(loss.detach())

    def round(self, batches: Sequence[Batch]) -> float:
        """One round over this rank's ``local_steps`` batches; returns the mean local-step loss."""
        if len(batches) != self.local_steps:
            raise ValueError(f"GradAlign.round: got {len(batches)} batches, "
                             f"expected local_steps={self.local_steps}")
        count = float(sum(len(b[1]) for b in batches))
        x = flat_params(self.model)
        if self.beta > 0:
            g_i, _ = self.full_gradient(batches)
            gbar = self._reduce_mean(g_i, count)
            start = displace(x, g_i, gbar, self.beta)
            self.last_displacement_norm = float((start - x).norm())
            set_flat_params(self.model, start)
        losses = 0.0
        self.model.train()
        for xb, yb in batches:
            self.optimizer.zero_grad(set_to_none=False)
            loss = self.loss_fn(self.model(xb), yb)
            loss.backward()
            self.optimizer.step()
            losses += float(loss.detach())
        xbar = self._reduce_mean(flat_params(self.model), count)
        set_flat_params(self.model, server_step(x, xbar, self.lr_server))
        self.rounds += 1
        return losses / len(batches)

    def state_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.exchange.bytes_sent = int(state.get("bytes_sent", 0))
        self.rounds = int(state.get("rounds", 0))
