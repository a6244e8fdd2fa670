"""One step's unit gradients held implicitly: only the inner products balancing needs.

Balancing a step never needs a unit's gradient ``g_i`` itself, only

* ``dots(V)``: the inner products ``<v, g_i>`` with a few d-vectors (the running sum ``s``, GraB's
  stale mean, an unpaired unit carried over from the previous step);
* ``gram()``: the pairwise products ``<g_i, g_j>`` within the step (the sequential sign decisions
  inside one step depend on them);
* ``weighted_sum(W)``: ``sum_i W[r, i] g_i`` (the step's mean gradient and the signed sum that
  updates ``s``);
* ``rows(idx)``: a few units' gradients in full (an unpaired last unit, D-GraB's exact mode).

:class:`DenseUnits` answers them from a materialised (U, d) matrix. :class:`GhostUnits` answers them
from each layer's inputs ``a`` and output gradients ``delta`` of one ordinary forward and backward,
without materialising per-example gradients (the "ghost norm" trick of differentially private SGD):
a ``Linear`` layer's per-example weight gradient is ``outer(delta_i, a_i)`` (the bias column is
``a``'s appended 1), so ``<V, g_i> = delta_i^T V a_i`` and ``<g_i, g_j> = (a_i . a_j)(delta_i .
delta_j)``. Applied at T positions (a ``Conv2d`` through ``unfold``, or a ``Linear`` on a
sequence) the gradient is ``sum_t outer(delta_it, a_it)``; where the ghost Gram (``T^2 (k + o)``
per pair) would cost more than the layer's parameters (``o k``), that layer's per-example gradients
are materialised with one batched matmul in the model's dtype instead (conv layers usually).

Every inner product is returned in float64. :func:`ghost_units` builds a :class:`GhostUnits` when
every trainable parameter belongs to a supported layer called exactly once per forward (``Linear``;
``Conv2d`` with ``groups=1`` and zero padding) and returns None otherwise (then use ``torch.func``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class DenseUnits:
    """Unit gradients as a materialised (U, d) matrix (any dtype; inner products in float64)."""

    def __init__(self, grads) -> None:
        g = torch.as_tensor(grads).detach()
        self.dtype = g.dtype if g.is_floating_point() else torch.float64
        self._g = g.double().numpy() if g.dtype != torch.float64 else g.numpy()
        self.n, self.d = self._g.shape

    def dots(self, v: np.ndarray) -> np.ndarray:
        return np.asarray(v, dtype=np.float64).reshape(-1, self.d) @ self._g.T

    def gram(self) -> np.ndarray:
        return self._g @ self._g.T

    def weighted_sum(self, w: np.ndarray) -> np.ndarray:
        return np.asarray(w, dtype=np.float64).reshape(-1, self.n) @ self._g

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        return self._g[list(idx)].copy()


class _Factor:
    """One layer's share of every unit's gradient: ``sum_t outer(delta[i, t], [a[i, t] | 1])``.

    ``a`` (U, T, kw) the layer's input rows, ``delta`` (U, T, o) its output gradients; the flat
    gradient holds the weight (o, kw) at ``w_off`` and, when ``b_off`` is not None, the bias (o,).
    Internally k = kw (+ 1 with a bias) and every part is viewed as (o, k).
    """

    def __init__(self, a: torch.Tensor, delta: torch.Tensor, w_off: int, b_off: Optional[int]) -> None:
        u, t, self.kw = a.shape
        self.o = delta.shape[2]
        self.k = self.kw + (b_off is not None)
        self.w_off, self.b_off = w_off, b_off
        self.ghost = t * t * (self.k + self.o) < self.o * self.k
        if self.ghost:
            if b_off is not None:
                a = torch.cat([a, a.new_ones((u, t, 1))], dim=2)
            self.a, self.delta = a.double(), delta.double()
            self.mat = None
        else:  # materialise this layer's per-example gradients (U, o * k) in the model's dtype
            w = torch.bmm(delta.transpose(1, 2), a)
            if b_off is not None:
                w = torch.cat([w, delta.sum(1).unsqueeze(2)], dim=2)
            self.mat = w.reshape(u, -1).double()

    def take(self, v: np.ndarray) -> torch.Tensor:
        """This layer's part of flat vectors ``v`` (m, d) as (m, o, k)."""
        m = len(v)
        w = torch.from_numpy(v[:, self.w_off:self.w_off + self.o * self.kw]).reshape(m, self.o, self.kw)
        if self.b_off is None:
            return w
        b = torch.from_numpy(v[:, self.b_off:self.b_off + self.o]).reshape(m, self.o, 1)
        return torch.cat([w, b], dim=2)

    def put(self, out: np.ndarray, part: torch.Tensor) -> None:
        """Write (m, o, k) into flat vectors ``out`` (m, d)."""
        m = len(out)
        out[:, self.w_off:self.w_off + self.o * self.kw] = part[:, :, :self.kw].reshape(m, -1).numpy()
        if self.b_off is not None:
            out[:, self.b_off:self.b_off + self.o] = part[:, :, self.kw].numpy()

    def _weight_view(self, v: np.ndarray) -> torch.Tensor:
        """The weight part of flat vectors ``v`` (m, d) as an (m, o, kw) view (no copy)."""
        part = v[:, self.w_off:self.w_off + self.o * self.kw]
        return torch.from_numpy(part).reshape(len(v), self.o, self.kw)

    def dots(self, v: np.ndarray) -> torch.Tensor:
        if self.ghost and self.a.shape[1] == 1:   # <V, g_i> = delta_i^T V_w a_i + delta_i . V_b
            a, delta = self.a[:, 0, :self.kw], self.delta[:, 0]
            vw = self._weight_view(v)
            out = torch.einsum("uo,uo->u", (a @ vw[0].T), delta)[None] if len(v) == 1 else \
                torch.einsum("uk,mok,uo->mu", a, vw, delta)
            if self.b_off is not None:
                out = out + torch.from_numpy(v[:, self.b_off:self.b_off + self.o]) @ delta.T
            return out
        vl = self.take(v)
        if self.mat is not None:
            return vl.reshape(len(v), -1) @ self.mat.T
        # <V_m, g_i> = sum_t delta_it^T V_m a_it
        va = torch.einsum("mok,utk->muto", vl, self.a)
        return torch.einsum("muto,uto->mu", va, self.delta)

    def gram(self) -> torch.Tensor:
        if self.mat is not None:
            return self.mat @ self.mat.T
        u, t = self.a.shape[:2]
        if t == 1:
            return (self.a[:, 0] @ self.a[:, 0].T) * (self.delta[:, 0] @ self.delta[:, 0].T)
        aa = self.a.reshape(u * t, -1) @ self.a.reshape(u * t, -1).T
        dd = self.delta.reshape(u * t, -1) @ self.delta.reshape(u * t, -1).T
        return (aa * dd).reshape(u, t, u, t).sum(dim=(1, 3))

    def weighted_sum_into(self, w: torch.Tensor, out: np.ndarray) -> None:
        """``out[r] += sum_i w[r, i] g_i`` restricted to this layer (writes its slices)."""
        if self.ghost and self.a.shape[1] == 1:   # per row: (w * delta)^T a straight into the flat vector
            a, delta = self.a[:, 0, :self.kw], self.delta[:, 0]
            flat = torch.from_numpy(out)
            for r in range(len(w)):
                dw = delta * w[r][:, None]
                view = flat[r, self.w_off:self.w_off + self.o * self.kw].view(self.o, self.kw)
                torch.mm(dw.T, a, out=view)
                if self.b_off is not None:
                    flat[r, self.b_off:self.b_off + self.o] = dw.sum(0)
            return
        self.put(out, self.weighted_sum(w))

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        if self.mat is not None:
            return (w @ self.mat).reshape(len(w), self.o, self.k)
        return torch.einsum("mu,uto,utk->mok", w, self.delta, self.a)

    def rows(self, idx: List[int]) -> torch.Tensor:
        if self.mat is not None:
            return self.mat[idx].reshape(len(idx), self.o, self.k)
        return torch.einsum("uto,utk->uok", self.delta[idx], self.a[idx])


class GhostUnits:
    """Per-example gradients of one batch kept as layer factors (see the module docstring)."""

    def __init__(self, factors: List[_Factor], n: int, d: int, dtype: torch.dtype) -> None:
        self.factors, self.n, self.d, self.dtype = factors, n, d, dtype

    def dots(self, v: np.ndarray) -> np.ndarray:
        v = np.ascontiguousarray(np.asarray(v, dtype=np.float64).reshape(-1, self.d))
        return sum(f.dots(v) for f in self.factors).numpy()

    def gram(self) -> np.ndarray:
        return sum(f.gram() for f in self.factors).numpy()

    def weighted_sum(self, w: np.ndarray) -> np.ndarray:
        wt = torch.from_numpy(np.asarray(w, dtype=np.float64).reshape(-1, self.n))
        out = np.zeros((len(wt), self.d))
        for f in self.factors:
            f.weighted_sum_into(wt, out)
        return out

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        idx = [int(i) for i in idx]
        out = np.zeros((len(idx), self.d))
        for f in self.factors:
            f.put(out, f.rows(idx))
        return out


def _supported(mod: nn.Module) -> bool:
    if type(mod) is nn.Linear:
        return True
    return (type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str))


def _layers(model: nn.Module) -> Optional[List[Tuple[nn.Module, int, Optional[int]]]]:
    """(layer, weight offset, bias offset or None) for every trainable layer, or None if some
    trainable parameter is outside a supported layer."""
    offsets: Dict[int, int] = {}
    off = 0
    for p in model.parameters():
        if p.requires_grad:
            offsets[id(p)] = off
            off += p.numel()
    layers, covered = [], set()
    for mod in model.modules():
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not _supported(mod) or not mod.weight.requires_grad or \
                (mod.bias is not None and not mod.bias.requires_grad):
            return None
        layers.append((mod, offsets[id(mod.weight)], None if mod.bias is None else offsets[id(mod.bias)]))
        covered.update(id(p) for p in own)
    if covered != set(offsets):
        return None
    return layers


def _inputs(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input arranged as (U, T, kw) rows multiplying the weight."""
    if isinstance(mod, nn.Conv2d):
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        a = cols.transpose(1, 2)
    else:
        a = x.reshape(len(x), -1, x.shape[-1])
    return a


def _per_example_losses(loss_fn: Callable, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if loss_fn is F.cross_entropy and not y.is_floating_point():
        return F.cross_entropy(out, y, reduction="none")
    from torch.func import vmap

    return vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)


def ghost_units(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                x: torch.Tensor, y: torch.Tensor
                ) -> Optional[Tuple[torch.Tensor, torch.Tensor, GhostUnits]]:
    """(per-example losses (U,), step mean gradient (d,), :class:`GhostUnits`) from one forward and
    one backward, or None when the model has a parameter outside a supported layer or calls a
    layer more than once (use ``torch.func`` then). ``loss_fn(out, y)`` must be the mean of
    per-example losses; the model must treat examples independently (no BatchNorm/Dropout)."""
    layers = _layers(model)
    if not layers:
        return None
    seen: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {id(m): [] for m, _, _ in layers}

    def hook(mod, inp, out):
        seen[id(mod)].append((inp[0].detach(), out))

    handles = [m.register_forward_hook(hook) for m, _, _ in layers]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    if any(len(v) != 1 for v in seen.values()):
        return None
    losses = _per_example_losses(loss_fn, out, y)
    outs = [seen[id(m)][0][1] for m, _, _ in layers]
    deltas = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
    n = len(x)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    factors = []
    for (mod, w_off, b_off), delta, o in zip(layers, deltas, outs):
        if delta is None:
            delta = torch.zeros_like(o)
        a = _inputs(mod, seen[id(mod)][0][0])
        if isinstance(mod, nn.Conv2d):
            delta = delta.reshape(n, delta.shape[1], -1).transpose(1, 2)
        else:
            delta = delta.reshape(n, -1, delta.shape[-1])
        factors.append(_Factor(a.detach(), delta.detach(), w_off, b_off))
    units = GhostUnits(factors, n, d, out.dtype)
    mean = torch.from_numpy(units.weighted_sum(np.full((1, n), 1.0 / n))[0]).to(out.dtype)
    return losses.detach(), mean, units



class PrependRow:
    """Unit gradients with one materialised float64 row (an unpaired unit carried over from the
    previous step) in front of ``units``: row 0 is ``row``, rows 1.. are ``units``'."""

    def __init__(self, row: np.ndarray, units) -> None:
        self.row = np.asarray(row, dtype=np.float64).reshape(-1)
        self.units = units
        self.n, self.d, self.dtype = units.n + 1, units.d, units.dtype

    def dots(self, v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64).reshape(-1, self.d)
        return np.concatenate([(v @ self.row)[:, None], self.units.dots(v)], axis=1)

    def gram(self) -> np.ndarray:
        g = np.empty((self.n, self.n))
        g[0, 0] = self.row @ self.row
        g[0, 1:] = g[1:, 0] = self.units.dots(self.row)[0]
        g[1:, 1:] = self.units.gram()
        return g

    def weighted_sum(self, w: np.ndarray) -> np.ndarray:
        w = np.asarray(w, dtype=np.float64).reshape(-1, self.n)
        return w[:, :1] * self.row + self.units.weighted_sum(w[:, 1:])

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        return np.stack([self.row.copy() if int(i) == 0 else self.units.rows([int(i) - 1])[0] for i in idx])
