"""Flat views of a model's trainable parameters and gradients (a utility module, no MPI)."""
from __future__ import annotations

import torch
from torch import nn


def flat_params(model: nn.Module) -> torch.Tensor:
    """All trainable parameters as one new flat vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def set_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the trainable parameters (inverse of :func:`flat_params`)."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                n = p.numel()
                p.copy_(flat[offset:offset + n].view_as(p))
                offset += n


def flat_grad(model: nn.Module) -> torch.Tensor:
    """All trainable parameters' gradients as one new flat vector (zeros where a grad is None)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters() if p.requires_grad])


def set_flat_grad(model: nn.Module, flat: torch.Tensor) -> None:
    """Write a flat vector into the parameters' ``.grad`` (inverse of :func:`flat_grad`)."""
    offset = 0
    for p in model.parameters():
        if p.requires_grad:
            n = p.numel()
            chunk = flat[offset:offset + n].view_as(p)
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
            offset += n
