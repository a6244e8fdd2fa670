"""``OrderedSampler`` (D-GraB and the other balancing orders) in a ``DistributedDataParallel`` loop.

Contract::

    import hpc_dgrab as hd
    from hpc_dgrab import ddp_order
    sampler = hd.OrderedSampler(len(dataset), order="dgrab", batch_size=32)
    channel = ddp_order.attach(sampler, ddp_model)          # the order data's all-reduce
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in DataLoader(dataset, batch_size=32, sampler=sampler):
            opt.zero_grad()
            loss = ddp_order.backward(sampler, ddp_model, loss_fn, x, y)
            opt.step()

* :func:`attach` gives the sampler an :class:`OrderChannel` as its payload channel: each batch's
  order data (D-GraB's signed pair differences, one float vector of the model's size) is summed over
  the DDP model's process group by one all-reduce of its own, at once (blocking), and handed to the
  sorter. The other choice, riding in DDP's last gradient bucket through the communication hook,
  would tie the sampler to one hook and grow the last bucket; the own all-reduce works with every
  hook (torch's PowerSGD/fp16 ones, :mod:`hpc_dgrab.ddp`'s) and without one. ``bytes_sent`` counts
  the order data this rank put into it.
* :func:`backward` replaces ``loss_fn(ddp_model(x), y).backward()``: it tells DDP's reducer that a
  backward pass follows (what DDP's own forward does: ``_pre_forward``/``_post_forward``, private
  methods of ``DistributedDataParallel`` in torch 2.x), then runs ``sampler.backward`` on the wrapped
  module, whose gradients reach DDP's buckets and hook as after an ordinary backward. For ``rr`` it is
  the ordinary forward and backward through DDP.
* Order data and gradient are the same sums as with ``DistributedOptimizer(sampler=...)``, so a DDP
  run and a DistributedOptimizer run visit the same examples in the same order.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["OrderChannel", "attach", "backward"]


class OrderChannel:
    """The sampler's payload channel over a process group (see the module docstring)."""

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self.bytes_sent = 0

    def add_payload(self, tensor: torch.Tensor,
                    on_result: Optional[Callable[[torch.Tensor], Any]] = None) -> torch.Tensor:
        """Sum ``tensor`` over the group now; call ``on_result(sum)``; return the sum."""
        total = tensor.detach().clone(memory_format=torch.contiguous_format)
        self.bytes_sent += total.numel() * total.element_size()
        dist.all_reduce(total, group=self.process_group)
        if on_result is not None:
            on_result(total)
        return total


def _check_ddp(ddp_model: Any) -> None:
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise UserError(f"expected a torch DistributedDataParallel model, got {type(ddp_model).__name__}")


def attach(sampler: Any, ddp_model: Any) -> OrderChannel:
    """Give ``sampler`` (an :class:`~hpc_dgrab.OrderedSampler`) a channel over ``ddp_model``'s
    process group; returns it."""
    _check_ddp(ddp_model)
    channel = OrderChannel(getattr(ddp_model, "process_group", None))
    sampler.attach(channel)
    return channel


def backward(sampler: Any, ddp_model: Any, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One batch's forward and backward through ``sampler`` with DDP's gradient sum (module
    docstring); the mean loss, detached."""
    _check_ddp(ddp_model)
    if not sampler.sorter.needs_grads:
        loss = loss_fn(ddp_model(x), y)
        loss.backward()
        return loss.detach()
    if torch.is_grad_enabled() and ddp_model.require_backward_grad_sync:
        ddp_model._pre_forward()
        ddp_model._post_forward(None)      # reducer.prepare_for_backward: the hooks fire in backward
    return sampler.backward(ddp_model.module, loss_fn, x, y)
