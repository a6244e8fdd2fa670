"""GradAlign: large-batch distributed / federated SGD that keeps SGD's gradient-alignment regulariser.

One *round* on every rank ``i`` (ALGORITHMS.md section 4), weights ``n_i`` = the number of examples
rank ``i`` uses in the round::

    g_i  = grad f_i(x)   on all of the round's examples of rank i     (skipped when beta == 0)
    gbar = sum_i n_i g_i / sum_i n_i                                   (all-reduce #1)
    x_i  = x - beta * (gbar - g_i)                                     (the displacement)
    K times:  x_i <- optimizer step on grad f_i(x_i; batch k)          (K = local_steps)
    xbar = sum_i n_i x_i / sum_i n_i                                   (all-reduce #2)
    x   <- x - lr_server * (x - xbar)                                  (lr_server = 1: x <- xbar)

With ``beta = 0`` and ``K = 1`` a round is exactly one step of large-batch SGD on the union of the
ranks' batches (also with momentum and weight decay, which are linear); with ``K > 1`` it is local
SGD / FedAvg. A round with K local batches of b examples consumes K*b examples per rank, so every
method sees the same data per epoch. The same object runs on one rank (``allreduce_`` = identity,
where it is plain SGD because gbar = g_i) or on N.

The numerics are the pure functions :func:`displace`, :func:`server_step` and
:func:`weighted_mean_`; :class:`GradAlign` only composes them around a model and an optimizer.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from hpc_dgrab.tensors import flat_grad, flat_params, set_flat_params

log = logging.getLogger(__name__)

AllReduce = Callable[[torch.Tensor], Any]
Batch = Tuple[torch.Tensor, torch.Tensor]


def displace(x: torch.Tensor, g_i: torch.Tensor, gbar: torch.Tensor, beta: float) -> torch.Tensor:
    """The GradAlign start point of rank i: ``x - beta * (gbar - g_i)`` (a new tensor)."""
    return x - beta * (gbar - g_i)


def server_step(x: torch.Tensor, xbar: torch.Tensor, lr_server: float = 1.0) -> torch.Tensor:
    """``x - lr_server * (x - xbar)``; exactly ``xbar`` (a copy) when ``lr_server == 1``."""
    if lr_server == 1.0:
        return xbar.clone()
    return x - lr_server * (x - xbar)


def weighted_mean_(vec: torch.Tensor, count: float, allreduce_: AllReduce) -> torch.Tensor:
    """Sample-count weighted mean across ranks, ``sum_i n_i v_i / sum_i n_i``, in one all-reduce.

    ``allreduce_`` sums a flat tensor in place across ranks. The count rides in the same message
    (one extra entry). Returns a new flat tensor; raises ``ValueError`` if every count is zero.
    """
    buf = torch.empty(vec.numel() + 1, dtype=vec.dtype)
    torch.mul(vec.reshape(-1), count, out=buf[:-1])
    buf[-1] = count
    allreduce_(buf)
    total = float(buf[-1])
    if total <= 0:
        raise ValueError("weighted_mean_: the counts sum to zero on every rank")
    return buf[:-1].div_(total).view_as(vec)


class GradAlign:
    """GradAlign driver: ``round(batches)`` runs one round (module docstring) on this rank.

    ``optimizer`` takes the K local steps (plain SGD for the method as published; its momentum
    buffers persist across rounds on every rank). ``allreduce_`` sums a flat CPU tensor across
    ranks in place (default: :func:`hpc_dgrab.comm.collectives.allreduce_` on COMM_WORLD).
    ``bytes_sent`` counts the payload this rank hands to the all-reduces, ``comm_s`` the seconds
    spent in them.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], beta: float,
                 local_steps: int = 1, lr_server: float = 1.0,
                 allreduce_: Optional[AllReduce] = None) -> None:
        if beta < 0:
            raise ValueError(f"GradAlign: beta must be >= 0, got {beta}")
        if local_steps < 1:
            raise ValueError(f"GradAlign: local_steps must be >= 1, got {local_steps}")
        if lr_server <= 0:
            raise ValueError(f"GradAlign: lr_server must be > 0, got {lr_server}")
        if allreduce_ is None:
            from hpc_dgrab.comm.collectives import allreduce_ as default

            allreduce_ = default
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.beta, self.local_steps, self.lr_server = float(beta), int(local_steps), float(lr_server)
        self._allreduce_ = allreduce_
        self.bytes_sent = 0
        self.rounds = 0
        self.comm_s = 0.0
        self.last_displacement_norm = 0.0

    def _reduce_mean(self, vec: torch.Tensor, count: float) -> torch.Tensor:
        self.bytes_sent += (vec.numel() + 1) * vec.element_size()
        t0 = time.perf_counter()
        try:
            return weighted_mean_(vec, count, self._allreduce_)
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
            raise ValueError(f"GradAlign.round: got {len(batches)} batches, expected local_steps={self.local_steps}")
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
        self.bytes_sent = int(state.get("bytes_sent", 0))
        self.rounds = int(state.get("rounds", 0))
