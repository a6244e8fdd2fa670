"""One step's unit gradients held implicitly: the inner products balancing needs, not the d-vectors.

A units object answers ``dots(V)`` (``<v, g_i>`` for a few d-vectors), ``gram()`` (``<g_i, g_j>``),
``weighted_sum(W)`` (``sum_i W[r, i] g_i``; ``weighted_sum_into`` writes into a tensor in its dtype),
``pair_products(s, a, b)`` (the products of the pair differences ``g[a_k] - g[b_k]``) and
``rows(idx)`` (a few units in full). Every product is float64; a d-vector handed in is converted
in blocks of :data:`CHUNK` elements.

:class:`DenseUnits` answers from a materialised (U, d) matrix. :class:`GhostUnits` answers from
each layer's inputs and output gradients of one ordinary forward and backward: a ``Linear`` layer
through the factors of its per-example gradients (never formed) where that is cheaper than forming
them, a ``Conv2d`` layer through one grouped-convolution weight gradient. :func:`ghost_units`
builds a GhostUnits when every trainable parameter belongs to a supported layer called exactly
once per forward (``Linear``; ``Conv2d`` with ``groups=1`` and zero padding), None otherwise (then
use ``torch.func``).
"""
from __future__ import annotations

import abc
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hpc_dgrab.tensors import param_slices

#: largest float64 block (elements) a d-vector is converted in at a time: bounds the transient memory
CHUNK = 1 << 17


def _as_rows(v: Any, d: int) -> torch.Tensor:
    """Flat vectors ``v`` (numpy or torch, (d,) or (m, d), float32 or float64) as an (m, d) tensor view."""
    t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else torch.as_tensor(v)
    return t.reshape(-1, d)


class Units(abc.ABC):
    """One step's unit gradients as the sorters see them (the seam between units and sorters).
    What every units object answers: ``dots``/``gram``/``weighted_sum``/``rows`` (abstract), and
    from them the products a pair-step needs and a weighted sum written into a given tensor."""

    n: int             #: number of units U
    d: int             #: parameters per unit gradient
    dtype: torch.dtype  #: the gradients' floating dtype (what a payload built from them is sent in)

    @abc.abstractmethod
    def dots(self, v: np.ndarray) -> np.ndarray:
        """``<v_r, g_i>`` (m, U) of flat vectors ``v`` ((d,) or (m, d))."""

    @abc.abstractmethod
    def gram(self) -> np.ndarray:
        """``<g_i, g_j>`` (U, U)."""

    @abc.abstractmethod
    def weighted_sum(self, w: np.ndarray) -> np.ndarray:
        """``sum_i w[r, i] g_i`` (m, d) in float64."""

    @abc.abstractmethod
    def rows(self, idx: Sequence[int]) -> np.ndarray:
        """The units ``idx``'s gradients (len(idx), d) in float64."""

    def pair_products(self, s: Optional[np.ndarray], a: np.ndarray,
                      b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(``<s, c_k>`` (P,), ``<c_l, c_k>`` (P, P)) of the pair differences ``c_k = g[a[k]] - g[b[k]]``
        (``s`` None: zeros)."""
        if s is None:
            base = np.zeros(len(a))
        else:
            sd = self.dots(s)[0]
            base = sd[a] - sd[b]
        g = self.gram()
        return base, g[np.ix_(a, a)] - g[np.ix_(a, b)] - g[np.ix_(b, a)] + g[np.ix_(b, b)]

    def weighted_sum_into(self, w: np.ndarray, out: torch.Tensor) -> None:
        """``out[:] = sum_i w[i] g_i`` (``w`` (U,), ``out`` a (d,) tensor of any floating dtype)."""
        out.copy_(torch.from_numpy(self.weighted_sum(np.asarray(w, dtype=np.float64).reshape(1, -1))[0]))


class DenseUnits(Units):
    """Unit gradients as a materialised (U, d) matrix (any dtype; inner products in float64)."""

    def __init__(self, grads) -> None:
        g = torch.as_tensor(grads).detach().cpu()
        self.dtype = g.dtype if g.is_floating_point() else torch.float64
        self._g = g.double().numpy() if g.dtype != torch.float64 else g.numpy()
        self.n, self.d = self._g.shape

    def dots(self, v: np.ndarray) -> np.ndarray:
        return np.asarray(v, dtype=np.float64).reshape(-1, self.d) @ self._g.T

    def gram(self) -> np.ndarray:
        return self._g @ self._g.T

    def pair_products(self, s: Optional[np.ndarray], a: np.ndarray,
                      b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        c = self._g[a] - self._g[b]   # the differences first: no cancellation in the products
        return (np.zeros(len(a)) if s is None else c @ np.asarray(s, dtype=np.float64)), c @ c.T

    def weighted_sum(self, w: np.ndarray) -> np.ndarray:
        return np.asarray(w, dtype=np.float64).reshape(-1, self.n) @ self._g

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        return self._g[list(idx)].copy()


class _Factor:
    """One layer's share of every unit's gradient as factors: ``sum_t outer(delta[i, t], [a[i, t] | 1])``.

    ``a`` (U, T, kw) the layer's input rows, ``delta`` (U, T, o) its output gradients; the flat
    gradient holds the weight (o, kw) at ``w_off`` and, when ``b_off`` is not None, the bias (o,).
    Internally k = kw (+ 1 with a bias) and every part is viewed as (o, k). Used only where the
    ghost products are cheaper than the per-example gradient (``T^2 (k + o) < o k``). Inner
    products run in float64 (the factors are small); weighted sums in the output's dtype.
    """

    def __init__(self, a: torch.Tensor, delta: torch.Tensor, w_off: int, b_off: Optional[int]) -> None:
        u, t, self.kw = a.shape
        self.o = delta.shape[2]
        self.k = self.kw + (b_off is not None)
        self.w_off, self.b_off = w_off, b_off
        # on the host (the balancing arithmetic is numpy/host torch); the model's dtype
        self.a_src, self.delta_src = a.detach().cpu().contiguous(), delta.detach().cpu().contiguous()
        self.a0, self.delta = self.a_src.double(), self.delta_src.double()   # a0: without the bias's 1s

    @property
    def a(self) -> torch.Tensor:
        """The inputs with the bias column of 1s appended, (U, T, k), float64."""
        if self.b_off is None:
            return self.a0
        return torch.cat([self.a0, self.a0.new_ones(self.a0.shape[:2] + (1,))], dim=2)

    def take(self, v: torch.Tensor) -> torch.Tensor:
        """This layer's part of flat vectors ``v`` (m, d) as (m, o, k), float64."""
        m = len(v)
        w = v[:, self.w_off:self.w_off + self.o * self.kw].reshape(m, self.o, self.kw)
        if self.b_off is not None:
            w = torch.cat([w, v[:, self.b_off:self.b_off + self.o].reshape(m, self.o, 1)], dim=2)
        return w.double()

    def put(self, out: torch.Tensor, part: torch.Tensor) -> None:
        """Write (m, o, k) into flat vectors ``out`` (m, d)."""
        m = len(out)
        out[:, self.w_off:self.w_off + self.o * self.kw] = part[:, :, :self.kw].reshape(m, -1)
        if self.b_off is not None:
            out[:, self.b_off:self.b_off + self.o] = part[:, :, self.kw]

    def dots(self, v: torch.Tensor) -> torch.Tensor:
        """``<v_m, g_i>`` (m, U) float64 for flat vectors ``v`` (m, d) of any floating dtype."""
        if self.a0.shape[1] == 1:   # <V, g_i> = delta_i^T V_w a_i + delta_i . V_b, V_w in row blocks
            a, delta = self.a0[:, 0], self.delta[:, 0]
            vw = v[:, self.w_off:self.w_off + self.o * self.kw].reshape(len(v), self.o, self.kw)
            out = torch.zeros((len(v), len(a)), dtype=torch.float64)
            step = max(1, CHUNK // max(self.kw, 1))
            for r in range(len(v)):
                for lo in range(0, self.o, step):
                    blk = vw[r, lo:lo + step].double()
                    out[r] += ((a @ blk.T) * delta[:, lo:lo + step]).sum(1)
            if self.b_off is not None:
                out += v[:, self.b_off:self.b_off + self.o].double() @ delta.T
            return out
        va = torch.einsum("mok,utk->muto", self.take(v), self.a)   # sum_t delta_it^T V_m a_it
        return torch.einsum("muto,uto->mu", va, self.delta)

    def gram(self) -> torch.Tensor:
        u, t = self.a0.shape[:2]
        bias = float(self.b_off is not None)   # [a | 1] . [a' | 1] = a . a' + 1
        if t == 1:
            a, delta = self.a0[:, 0], self.delta[:, 0]
            return (a @ a.T + bias) * (delta @ delta.T)
        a = self.a0.reshape(u * t, -1)
        dd = self.delta.reshape(u * t, -1) @ self.delta.reshape(u * t, -1).T
        return ((a @ a.T + bias) * dd).reshape(u, t, u, t).sum(dim=(1, 3))

    def weighted_sum_into(self, w: torch.Tensor, out: torch.Tensor) -> None:
        """``out[r] = sum_i w[r, i] g_i`` restricted to this layer (``out`` (m, d), any floating dtype:
        float64 from the float64 factors, else in the model's dtype, as autograd would)."""
        if self.a0.shape[1] == 1:   # per row: (w * delta)^T a straight into the flat vector
            wide = out.dtype == torch.float64
            a = (self.a0 if wide else self.a_src.to(out.dtype))[:, 0]
            delta = (self.delta if wide else self.delta_src.to(out.dtype))[:, 0]
            for r in range(len(w)):
                dw = delta * w[r].to(out.dtype)[:, None]
                torch.mm(dw.T, a, out=out[r, self.w_off:self.w_off + self.o * self.kw].view(self.o, self.kw))
                if self.b_off is not None:
                    torch.sum(dw, 0, out=out[r, self.b_off:self.b_off + self.o])
            return
        self.put(out, torch.einsum("mu,uto,utk->mok", w, self.delta, self.a))

    def rows(self, idx: List[int]) -> torch.Tensor:
        return torch.einsum("uto,utk->uok", self.delta[idx], self.a[idx])


class GhostUnits(Units):
    """Per-example gradients of one batch: layer factors where cheaper, else materialised per layer.

    ``dense`` is a list of (flat offset, (U, length) tensor) blocks of materialised per-example
    gradients (conv layers, usually); they are gathered into one float64 (U, dm) matrix whose
    column spans map to flat offsets. ``factors`` are the :class:`_Factor` layers. All products run
    in torch (its thread setting), the answers are numpy float64. A d-vector given (the running
    sum, float32 or float64) is converted to float64 only in blocks (no float64 copy of all of it).
    """

    def __init__(self, dense: List[Tuple[int, torch.Tensor]], factors: List[_Factor], n: int, d: int,
                 dtype: torch.dtype) -> None:
        self.factors, self.n, self.d, self.dtype = factors, n, d, dtype
        dense = sorted(dense, key=lambda part: part[0])
        self.spans: List[Tuple[int, int, int]] = []   # (flat offset, matrix column, length), merged
        col = 0
        for off, block in dense:
            ln = block.shape[1]
            if self.spans and self.spans[-1][0] + self.spans[-1][2] == off:
                f, c, l0 = self.spans[-1]
                self.spans[-1] = (f, c, l0 + ln)
            else:
                self.spans.append((off, col, ln))
            col += ln
        self.mat = torch.cat([blk for _, blk in dense], dim=1).double() if dense else \
            torch.zeros((n, 0), dtype=torch.float64)

    def _cols(self, v: torch.Tensor) -> torch.Tensor:
        """The materialised columns of flat vectors ``v`` (m, d) as float64 (m, dm)."""
        if not self.spans:
            return v[:, :0].double()
        return torch.cat([v[:, f:f + ln] for f, _, ln in self.spans], dim=1).double()

    def _dots(self, v: torch.Tensor) -> torch.Tensor:
        out = self._cols(v) @ self.mat.T
        for f in self.factors:
            out += f.dots(v)
        return out

    def dots(self, v: np.ndarray) -> np.ndarray:
        return self._dots(_as_rows(v, self.d)).numpy()

    def _factor_gram(self) -> Optional[torch.Tensor]:
        grams = [f.gram() for f in self.factors]
        return sum(grams[1:], grams[0]) if grams else None

    def gram(self) -> np.ndarray:
        out = self.mat @ self.mat.T
        fg = self._factor_gram()
        return (out if fg is None else out + fg).numpy()

    def pair_products(self, s: Optional[np.ndarray], a: np.ndarray,
                      b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        p = len(a)
        ia: Union[slice, torch.Tensor]
        ib: Union[slice, torch.Tensor]
        if p and np.array_equal(a, np.arange(0, 2 * p, 2)) and np.array_equal(b, a + 1):
            ia, ib = slice(0, 2 * p, 2), slice(1, 2 * p, 2)   # consecutive pairs: strided views
        else:
            ia, ib = torch.from_numpy(a), torch.from_numpy(b)
        c = self.mat[ia] - self.mat[ib]
        cross = c @ c.T      # materialised part: the differences first (P, dm), no cancellation
        v = None if s is None else _as_rows(s, self.d)
        base = torch.zeros(p, dtype=torch.float64) if v is None else c @ self._cols(v)[0]
        fg = self._factor_gram()
        if fg is not None:
            ga, gb = fg[ia], fg[ib]
            cross += ga[:, ia] - ga[:, ib] - gb[:, ia] + gb[:, ib]
            if v is not None:
                sd = self.factors[0].dots(v)
                for fac in self.factors[1:]:
                    sd = sd + fac.dots(v)
                base += sd[0][ia] - sd[0][ib]
        return base.numpy(), cross.numpy()

    def weighted_sum_t(self, w: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum_i w[r, i] g_i`` into ``out`` ((m, d), default a new float64 tensor; in ``out``'s dtype)."""
        if out is None:
            out = torch.zeros((len(w), self.d), dtype=torch.float64)
        if self.spans:
            part = w @ self.mat
            for f, c, ln in self.spans:
                out[:, f:f + ln] = part[:, c:c + ln]
        for fac in self.factors:
            fac.weighted_sum_into(w, out)
        return out

    def weighted_sum(self, w: np.ndarray) -> np.ndarray:
        wt = torch.from_numpy(np.asarray(w, dtype=np.float64).reshape(-1, self.n))
        return self.weighted_sum_t(wt).numpy()

    def weighted_sum_into(self, w: np.ndarray, out: torch.Tensor) -> None:
        self.weighted_sum_t(torch.from_numpy(np.asarray(w, dtype=np.float64).reshape(1, -1)), out.view(1, -1))

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        idx = [int(i) for i in idx]
        out = torch.zeros((len(idx), self.d), dtype=torch.float64)
        for f, c, ln in self.spans:
            out[:, f:f + ln] = self.mat[idx, c:c + ln]
        for fac in self.factors:
            fac.put(out, fac.rows(idx))
        return out.numpy()


def _supported(mod: nn.Module) -> bool:
    if type(mod) is nn.Linear:
        return True
    return (type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str))


def _layers(model: nn.Module) -> Optional[List[Tuple[nn.Module, int, Optional[int]]]]:
    """(layer, weight offset, bias offset or None) for every trainable layer, or None if some
    trainable parameter is outside a supported layer."""
    offsets: Dict[int, int] = {id(p): off for p, off, _ in param_slices(model)}
    layers: List[Tuple[nn.Module, int, Optional[int]]] = []
    covered: Set[int] = set()
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


@functools.lru_cache(maxsize=16)
def _shape_only(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor standing for the grouped convolution's weight (only its shape is used; never written)."""
    return torch.zeros(shape, dtype=dtype, device=device)


def _conv_per_example(mod: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients (U, o * c * kh * kw) of a ``groups=1`` conv layer from its input
    ``x`` and output gradient ``delta``: the batch becomes the groups of one grouped convolution's
    weight gradient (the same kernel autograd runs for the summed gradient; no unfold)."""
    n, c = x.shape[:2]
    o = delta.shape[1]
    if c == 1 and tuple(mod.stride) == (1, 1) and tuple(mod.dilation) == (1, 1):
        # one input channel: a correlation of each image with its own output gradients, the batch as
        # the channels of one grouped convolution (faster than the grouped weight gradient here)
        out = F.conv2d(x.transpose(0, 1), delta.reshape((n * o, 1) + tuple(delta.shape[2:])),
                       padding=mod.padding, groups=n)
        return out.reshape(n, -1)
    shape = (n * o, c) + tuple(mod.weight.shape[2:])
    gw = torch.ops.aten.convolution_backward(
        delta.reshape((1, n * o) + tuple(delta.shape[2:])), x.reshape((1, n * c) + tuple(x.shape[2:])),
        _shape_only(tuple(shape), x.dtype, x.device), None, list(mod.stride), list(mod.padding),
        list(mod.dilation), False, [0, 0], n, [False, True, False])[1]
    return gw.reshape(n, -1)


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
    dense: List[Tuple[int, torch.Tensor]] = []
    factors = []
    for (mod, w_off, b_off), delta, o in zip(layers, deltas, outs):
        if delta is None:
            delta = torch.zeros_like(o)
        delta = delta.detach()
        inp = seen[id(mod)][0][0]
        if isinstance(mod, nn.Conv2d):   # per-example weight gradients: one grouped conv backward
            dense.append((w_off, _conv_per_example(mod, inp, delta)))
            if b_off is not None:
                dense.append((b_off, delta.sum(dim=(2, 3))))
            continue
        a = inp.reshape(n, -1, inp.shape[-1])
        delta = delta.reshape(n, -1, delta.shape[-1])
        t, kw, od = a.shape[1], a.shape[2], delta.shape[2]
        k = kw + (b_off is not None)
        if t * t * (k + od) < od * k:
            factors.append(_Factor(a, delta, w_off, b_off))
        else:   # a Linear applied at many positions: materialise with one batched matmul
            dense.append((w_off, torch.bmm(delta.transpose(1, 2), a).reshape(n, -1)))
            if b_off is not None:
                dense.append((b_off, delta.sum(1)))
    # the per-example blocks move to the host once (a no-op on CPU); the small products run there
    units = GhostUnits([(off, blk.cpu()) for off, blk in dense], factors, n, d, out.dtype)
    mean = units.weighted_sum_t(torch.full((1, n), 1.0 / n, dtype=torch.float64),
                                torch.empty((1, d), dtype=out.dtype))[0]
    return losses.detach(), mean, units



class PrependRow(Units):
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
