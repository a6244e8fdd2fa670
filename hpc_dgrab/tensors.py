"""Flat views of a model's trainable parameters and gradients (a utility module, no MPI)."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn


def param_slices(model: nn.Module) -> List[Tuple[nn.Parameter, int, int]]:
    """(parameter, offset, numel) of every trainable parameter in the flat vectors of this module."""
    out, offset = [], 0
    for p in model.parameters():
        if p.requires_grad:
            out.append((p, offset, p.numel()))
            offset += p.numel()
    return out


def flat_params(model: nn.Module) -> torch.Tensor:
    """All trainable parameters as one new flat vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def set_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the trainable parameters (inverse of :func:`flat_params`)."""
    with torch.no_grad():
        for p, offset, n in param_slices(model):
            p.copy_(flat[offset:offset + n].view_as(p))


def flat_grad(model: nn.Module) -> torch.Tensor:
    """All trainable parameters' gradients as one new flat vector (zeros where a grad is None)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters() if p.requires_grad])


def set_flat_grad(model: nn.Module, flat: torch.Tensor) -> None:
    """Write a flat vector into the parameters' ``.grad`` (inverse of :func:`flat_grad`)."""
    for p, offset, n in param_slices(model):
        chunk = flat[offset:offset + n].view_as(p)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
