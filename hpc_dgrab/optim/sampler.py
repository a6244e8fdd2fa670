"""``OrderedSampler``: example ordering (RR, GraB, PairBalance, D-GraB) for the user's own DataLoader.

D-GraB in a user's loop (the marked lines are the additions)::

    sampler = hd.OrderedSampler(len(dataset), order="dgrab", batch_size=32)      # +
    loader = DataLoader(dataset, batch_size=32, sampler=sampler)
    opt = hd.DistributedOptimizer(opt, model.named_parameters())
    sampler.attach(opt)                                                            # +
    for epoch in range(epochs):
        sampler.set_epoch(epoch)                                                   # +
        for x, y in loader:
            opt.zero_grad()
            loss = sampler.backward(model, loss_fn, x, y)    # instead of loss_fn(model(x), y).backward()
            opt.step()

The sampler is a ``torch.utils.data.Sampler`` over THIS rank's own examples (each rank has its own
dataset or shard; nothing is split here). Its order for an epoch is fixed when the epoch starts:
``set_epoch(e)`` (as with ``DistributedSampler``) moves to epoch ``e``, and a sorter that learns from
gradients (``grab``, ``pairbalance``, ``dgrab``) computes the new order from what it saw in the
epoch before. ``batch_size`` (optional, collective once at construction) cuts every epoch to the
same number of full batches on every rank (the smallest rank's), so that every rank makes the same
number of optimizer steps.

``sampler.backward(model, loss_fn, x, y)`` replaces ``loss_fn(model(x), y).backward()``: for ``rr`` it
is exactly that; for the balancing sorters it computes the batch's unit gradients (per-example
gradients with ``torch.func``, or ``units="microbatch:K"`` micro-batch gradients for models with
BatchNorm/Dropout), hands them to the sorter, and accumulates their mean, which is the ordinary
mini-batch gradient, into ``.grad`` through autograd (so the optimizer's hooks and buckets work as
after a normal backward; no second backward pass). D-GraB's order data (its signed pair
differences) goes into the optimizer's payload channel, i.e. rides in the same all-reduce as the
gradient, and the sum is folded into the sorter when the optimizer synchronizes (the sampler
knows the optimizer, through ``attach(opt)``; the optimizer never calls the sampler). The batch's
example indices are taken from the epoch's order in sequence (pass ``indices=`` when batches are
not consumed in order). ``payload_bytes`` counts the order data this rank put into the channel (in
the gradients' dtype). ``state_dict()`` / ``load_state_dict()`` save and restore the order.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, Optional, Protocol, Sequence, Union

import numpy as np
import torch
from torch import nn

from hpc_dgrab import api
from hpc_dgrab.errors import UserError
from hpc_dgrab.order import SORTERS, GradSorter, make_sorter
from hpc_dgrab.tensors import param_slices

log = logging.getLogger(__name__)


class PayloadChannel(Protocol):
    """What the sampler needs of an optimizer: ``DistributedOptimizer.add_payload``."""

    def add_payload(self, tensor: torch.Tensor,
                    on_result: Optional[Callable[[torch.Tensor], Any]] = None) -> Any:
        ...


class OrderedSampler(torch.utils.data.Sampler):
    """This rank's example order for ``num_examples`` examples; ``order`` one of rr, grab,
    pairbalance, dgrab; ``mode`` parallel|exact (dgrab); ``payload`` full|half (dgrab parallel: the
    whole signed sum every step, or half of it with the rest sent the next step); ``units``
    example|microbatch:K."""

    def __init__(self, num_examples: int, order: str = "rr", seed: int = 0, mode: str = "parallel",
                 units: str = "example", batch_size: Optional[int] = None, payload: str = "full") -> None:
        ctx = api.context("OrderedSampler(...)")
        if order not in SORTERS:
            raise UserError(f"unknown order {order!r}; choose from {', '.join(SORTERS)}")
        try:
            self.sorter = make_sorter(order, int(num_examples), seed=seed, rank=ctx.rank, world_size=ctx.size,
                                      mode=mode, units=units, payload=payload)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.num_examples = int(num_examples)
        self.length = self.num_examples
        if batch_size is not None:
            if batch_size < 1:
                raise UserError(f"batch_size must be >= 1, got {batch_size}")
            from mpi4py import MPI

            steps = ctx.comm.allreduce(self.num_examples // int(batch_size), op=MPI.MIN)
            if steps == 0:
                raise UserError(f"a rank has fewer than batch_size={batch_size} examples", collective=True)
            self.length = steps * int(batch_size)
        self._pos = 0
        self._optimizer: Optional[PayloadChannel] = None
        self._checked = False
        self.payload_bytes = 0

    @property
    def epoch(self) -> int:
        return self.sorter.epoch

    def attach(self, optimizer: PayloadChannel) -> None:
        """Send the order data through ``optimizer``'s payload channel (a ``DistributedOptimizer``);
        attaching again replaces the optimizer."""
        self._optimizer = optimizer

    def set_epoch(self, epoch: int) -> None:
        """Move to epoch ``epoch`` (the sorter finishes every epoch in between)."""
        if epoch < self.sorter.epoch:
            raise UserError(f"set_epoch({epoch}): the sampler is at epoch {self.sorter.epoch} already; "
                            "an order cannot go back (load a state_dict to resume)")
        while self.sorter.epoch < epoch:
            self.sorter.end_epoch()
            self._pos = 0

    def order(self) -> np.ndarray:
        """This epoch's order (the first ``len(self)`` entries are visited)."""
        return self.sorter.epoch_order()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[:self.length].tolist())

    def __len__(self) -> int:
        return self.length

    def backward(self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor, indices: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Forward and backward of one batch (see the module docstring); returns the mean loss (detached)."""
        batch: Union[Sequence[int], np.ndarray] = \
            self.order()[self._pos:self._pos + len(x)] if indices is None else indices
        self._pos += len(x)
        sorter = self.sorter
        if not sorter.needs_grads:
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss.detach()
        assert isinstance(sorter, GradSorter)   # needs_grads: a BalancingSorter, which implements it
        if not self._checked:
            try:
                sorter.check_model(model)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            self._checked = True
        loss, grad, payload = sorter.balance_step(model, loss_fn, x, y, batch)
        slices = param_slices(model)
        chunks = [grad[o:o + n].view_as(p).to(device=p.device, dtype=p.dtype) for p, o, n in slices]
        # accumulates into .grad, runs the hooks
        torch.autograd.backward([p for p, _, _ in slices], grad_tensors=chunks)
        if payload is None:
            sorter.apply_payload(None)
        elif self._optimizer is None:
            raise UserError(f"order={sorter.name!r} sends order data with the gradient: pass the "
                            "sampler to DistributedOptimizer(..., sampler=sampler) or call "
                            "sampler.attach(opt)")
        else:
            self.payload_bytes += payload.numel() * slices[0][0].element_size()
            self._optimizer.add_payload(payload, on_result=sorter.apply_payload)
        return loss.detach()

    def state_dict(self) -> Dict[str, Any]:
        """The sorter's state (order, epoch, running sums) and the position in the epoch."""
        return {"sorter": self.sorter.state_dict(), "pos": self._pos, "length": self.length,
                "payload_bytes": self.payload_bytes}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        try:
            self.sorter.load_state_dict(state["sorter"])
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self._pos = int(state.get("pos", 0))
        self.payload_bytes = int(state.get("payload_bytes", 0))
