"""``hd.SyncBatchNorm``: batch normalisation whose batch statistics are over every rank's batch.

Drop-in for ``torch.nn.BatchNorm1d/2d/3d`` (any input ``(N, C, ...)``); Horovod's class of the same
name. In training, mean and variance are those of the union of the ranks' batches (batches may
differ in size), computed in two passes (sum and count, then the sum of squared deviations) so
that precision does not depend on the mean's size; the running statistics get the union's
unbiased variance. Backward is exact: each statistic's all-reduce has an all-reduce of its
gradient as backward, so every input's gradient is the one-process gradient of the summed loss
over the concatenated batch; ``weight``/``bias`` get this rank's share (the
``DistributedOptimizer`` averages them, as for any parameter). In eval mode, or on one rank, it is
plain batch normalisation.

Collective in training: every rank of the ``init`` communicator (or of ``process_set``) runs the
layer's forward and backward the same number of times, in the same order as its other layers.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Tuple

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from hpc_dgrab import api

log = logging.getLogger(__name__)

__all__ = ["SyncBatchNorm"]


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over ranks; its backward is the sum of the gradient over ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, transport: Any) -> torch.Tensor:
        ctx.transport = transport
        return transport.allreduce_(tensor.detach().clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return ctx.transport.allreduce_(grad.detach().clone(memory_format=torch.contiguous_format)), None


class SyncBatchNorm(_BatchNorm):
    """Batch normalisation over the union of the ranks' batches (module docstring).

    Arguments as ``torch.nn.BatchNorm2d``; ``process_set``: normalise over its ranks only."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_set: Any = None,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_set = process_set

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _transport(self) -> Any:
        from hpc_dgrab.comm.collectives import default_transport
        from hpc_dgrab.sets import process_set_comm

        ctx = api.context("SyncBatchNorm in training")
        return default_transport(process_set_comm(self.process_set, ctx.comm, "SyncBatchNorm"))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        transport = self._transport()
        if transport.size == 1:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        c = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        count = torch.tensor([input.numel() // max(c, 1)], dtype=input.dtype, device=input.device)
        total = _SumOverRanks.apply(torch.cat([input.sum(dims), count]), transport)
        n = total[c]
        mean = total[:c] / n
        shape = [1, c] + [1] * (input.dim() - 2)
        centred = input - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims), transport) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased = var.detach() * (n / (n - 1)) if n.item() > 1 else var.detach()
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return out
