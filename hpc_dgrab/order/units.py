"""Balancing units of one step: per-example gradients (torch.func) or micro-batch mean gradients.

``unit_gradients(model, loss_fn, x, y, units)`` returns the step's mean loss, the step's gradient
(the mean of the per-example gradients, i.e. the ordinary mini-batch gradient, with no second
backward pass) and one flat gradient per unit. ``step_units`` returns the same but with the units
as an object that answers inner products (:mod:`hpc_dgrab.order.ghost`): for per-example units of a
model made of ``Linear``/``Conv2d`` layers it never materialises the per-example gradients of the
``Linear`` layers (one forward, one backward to the layers' outputs); otherwise it wraps
``unit_gradients``' matrix.

* ``units="example"``: ``vmap(grad(...))`` over ``functional_call``; needs a model whose output for
  one example does not depend on the others and that draws no randomness, so models with
  BatchNorm or Dropout are refused (:func:`check_units`) — use micro-batches for them.
  Multinomial logistic regression (``Flatten`` + ``Linear`` or a bare ``Linear``, trained with
  ``cross_entropy``) uses the closed form ``grad_i = (softmax(z_i) - onehot(y_i)) x_i^T`` instead
  (same numbers, no vmap overhead).
* ``units="microbatch:K"``: consecutive groups of K examples (the last may be smaller); each unit's
  gradient is its group's mean gradient (one ordinary backward per group; BatchNorm then normalises
  over the group and updates its running statistics once per group).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import nn

from hpc_dgrab.order.ghost import DenseUnits, ghost_units


def parse_units(spec: str) -> Optional[int]:
    """``"example"`` -> None; ``"microbatch:K"`` -> K (K >= 1). Raises ValueError otherwise."""
    if spec == "example":
        return None
    if spec.startswith("microbatch:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return k
    raise ValueError(f"order units must be 'example' or 'microbatch:K' with K >= 1, got {spec!r}")


def check_units(model: nn.Module, spec: str) -> None:
    """Raise ValueError (one line) if ``spec`` cannot be used with ``model``."""
    if parse_units(spec) is not None:
        return
    bad = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _unsafe_types())})
    if bad:
        raise ValueError(f"per-example gradients need a model without BatchNorm/Dropout (this one has "
                         f"{', '.join(bad)}); use micro-batch units (--order-units microbatch:K)")


def _unsafe_types() -> tuple:
    return (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def split_units(n: int, spec: str) -> List[slice]:
    """Row slices of a batch of ``n`` examples, one per unit."""
    k = parse_units(spec) or 1
    return [slice(lo, min(lo + k, n)) for lo in range(0, n, k)]


def per_example_gradients(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                          x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-example losses (B,), per-example flat gradients (B, d)) in ``model.parameters()`` order."""
    layer = _logreg_layer(model)
    if layer is not None and loss_fn is nn.functional.cross_entropy and not y.is_floating_point():
        return logreg_per_example(layer, x, y)
    from torch.func import functional_call, grad_and_value, vmap

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = {name: b for name, b in model.named_buffers()}

    def one(p, xi, yi):
        out = functional_call(model, ({**p, **frozen}, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    grads, losses = vmap(grad_and_value(one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([grads[name].reshape(len(x), -1) for name in names], dim=1)
    return losses, flat


def _logreg_layer(model: nn.Module) -> Optional[nn.Linear]:
    """The Linear layer of a plain multinomial logistic regression model, else None."""
    mods = list(model) if isinstance(model, nn.Sequential) else [model]
    if len(mods) == 2 and isinstance(mods[0], nn.Flatten) and mods[0].start_dim == 1:
        mods = mods[1:]
    if len(mods) == 1 and type(mods[0]) is nn.Linear and mods[0].bias is not None \
            and all(p.requires_grad for p in mods[0].parameters()):
        return mods[0]
    return None


def logreg_per_example(layer: nn.Linear, x: torch.Tensor,
                       y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Closed-form per-example cross-entropy losses and flat gradients [weight | bias] of ``layer``."""
    with torch.no_grad():
        feats = x.reshape(len(x), -1)
        logits = feats @ layer.weight.T + layer.bias
        logp = torch.log_softmax(logits, dim=1)
        losses = -logp.gather(1, y.reshape(-1, 1)).squeeze(1)
        delta = logp.exp()
        delta[torch.arange(len(y)), y] -= 1
        w = (delta[:, :, None] * feats[:, None, :]).reshape(len(x), -1)
        return losses, torch.cat([w, delta], dim=1)


def unit_gradients(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   x: torch.Tensor, y: torch.Tensor, spec: str = "example"
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[slice]]:
    """(mean loss, step gradient (d,), unit gradients (U, d), unit row slices) for one batch."""
    slices = split_units(len(x), spec)
    if parse_units(spec) is None:
        check_units(model, spec)
        losses, g = per_example_gradients(model, loss_fn, x, y)
        return losses.mean(), g.mean(0), g, slices
    params = [p for p in model.parameters() if p.requires_grad]
    rows: List[torch.Tensor] = []
    loss_sum: Union[float, torch.Tensor] = 0.0
    for sl in slices:
        loss = loss_fn(model(x[sl]), y[sl])
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                               for gi, p in zip(gs, params)]))
        loss_sum = loss_sum + loss.detach() * (sl.stop - sl.start)
    g = torch.stack(rows)
    weights = torch.tensor([sl.stop - sl.start for sl in slices], dtype=g.dtype, device=g.device) / len(x)
    return torch.as_tensor(loss_sum) / len(x), weights @ g, g, slices


def step_units(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               x: torch.Tensor, y: torch.Tensor, spec: str = "example"):
    """(mean loss, step gradient (d,), units (``GhostUnits`` or ``DenseUnits``), unit row slices)."""
    if parse_units(spec) is None:
        check_units(model, spec)
        got = ghost_units(model, loss_fn, x, y)
        if got is not None:
            losses, mean, units = got
            return losses.mean(), mean, units, split_units(len(x), spec)
    loss, grad, g, slices = unit_gradients(model, loss_fn, x, y, spec)
    return loss, grad, DenseUnits(g), slices
