"""CHOCO-gossip numerics (Koloskova et al., 2019): compressed gossip with public copies. No MPI.

Every rank ``i`` holds its model ``x_i``, its own *public copy* ``x̂_i`` and a copy ``x̂_j`` of every
in-neighbour's public copy. One gossip step of rank ``i`` (:class:`ChocoState`):

* consensus: ``x_i += gamma * sum_j w_ij (x̂_j - x̂_i)`` over its in-neighbours ``j``
  (:meth:`ChocoState.consensus_`);
* compress: ``q_i = C(x_i - x̂_i)`` — the Top-k or RegTop-k selection of the difference from its
  public copy (:meth:`ChocoState.select`); ``x̂_i += q_i`` (:meth:`ChocoState.apply_own`) and the
  same ``q_i`` goes to every out-neighbour, which adds it to its copy (:meth:`ChocoState.apply_received`).

Error feedback is built in: what was not sent stays in ``x_i - x̂_i`` and competes for selection
at the next step, so the public copy ``x̂_i`` is this scheme's error memory.

Contracts:

* Mixing weights ``w_ij`` (:func:`mixing_weights`): a row of the metropolis matrix on an
  undirected graph, of the uniform matrix ``1/(d+1)`` on a directed one. The matrix must be doubly
  stochastic (every undirected graph; a directed one whose in- and out-degrees are all equal, e.g.
  ``exponential``) and the graph static (not time-varying); else ValueError.
  With a doubly stochastic ``W`` and every copy current, a consensus step keeps ``sum_i x_i``.
* Copies are exact: a receiver adds the same ``(indices, values)`` to its copy with the same
  ``index_add_`` as the sender to its own, in the same order, so once every message is applied
  the copy equals the owner's public copy bit for bit.
* Wire format of one message (:func:`encode` / :func:`decode`): ``2k`` elements of the model's
  dtype, the ``k`` indices (int32 bits for float32, int64 for float64) then the ``k`` values;
  on the wire ``k * (index + value bytes)`` plus the engine's header.
* ``gamma`` (consensus step size), default :func:`default_gamma` ``= min(1, 2 * density)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from hpc_dgrab.comm.topology import Topology
from hpc_dgrab.compress.base import Compressor, State

log = logging.getLogger(__name__)

#: the index dtype carried in a message of each value dtype (same width: one buffer of one dtype)
INDEX_DTYPE = {torch.float32: torch.int32, torch.float64: torch.int64}


def default_gamma(density: float) -> float:
    """The default consensus step ``min(1, 2 * density)`` (CHOCO needs gamma of the order of the
    compressor's density; measured on the tests' quadratic: it converges, 4x larger may not)."""
    return min(1.0, 2.0 * float(density))


def mixing_weights(topology: Topology, rank: int) -> Dict[int, float]:
    """``{j: w_ij}`` for ``rank``'s in-neighbours (see the module docstring); ValueError when the
    graph is time-varying or its mixing matrix is not doubly stochastic."""
    if topology.time_varying:
        raise ValueError(f"compressed gossip needs a static graph; {topology.name!r} changes every step")
    w = topology.mixing_matrix("uniform" if topology.directed else "metropolis")
    if not (np.allclose(w.sum(axis=0), 1.0) and np.allclose(w.sum(axis=1), 1.0)):
        raise ValueError(f"compressed gossip needs a doubly stochastic mixing matrix; {topology.name!r} on "
                         f"{topology.n} ranks has unequal degrees (use an undirected graph, or a "
                         "circulant directed one such as exponential)")
    return {j: float(w[rank, j]) for j in topology.in_neighbors(rank)}


def message_numel(k: int) -> int:
    """Elements of one message carrying ``k`` (index, value) pairs."""
    return 2 * int(k)


def encode(indices: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``indices`` and ``values`` (k each) into ``out`` (``2k`` elements of ``values``' dtype)."""
    k = values.numel()
    out[:k].view(INDEX_DTYPE[out.dtype]).copy_(indices)
    out[k:].copy_(values)
    return out


def decode(data: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(indices as int64, values)`` of a message (views or small copies of ``data``)."""
    k = data.numel() // 2
    return data[:k].view(INDEX_DTYPE[data.dtype]).to(torch.int64), data[k:]


@dataclass
class ChocoState:
    """One rank's public copies: its own ``x_hat`` and ``copies[j]`` of each in-neighbour's, the
    mixing ``weights`` ``{j: w_ij}``, ``gamma``, and the compressor's per-rank ``cstate``.

    ``sent``: what the last :meth:`select` chose (indices, values and the neighbours' copy sum
    there), for RegTop-k's posterior at the next selection (see :meth:`select`)."""

    x_hat: torch.Tensor
    copies: Dict[int, torch.Tensor]
    weights: Dict[int, float]
    gamma: float
    cstate: State = field(default_factory=dict)
    sent: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    @classmethod
    def start(cls, x: torch.Tensor, weights: Dict[int, float], gamma: float) -> ChocoState:
        """Every public copy starts at ``x`` (all ranks start from the same model)."""
        if not 0.0 < float(gamma) <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        x = x.detach().reshape(-1)
        return cls(x.clone(), {j: x.clone() for j in sorted(weights)}, dict(weights), float(gamma))

    def neighbour_term(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum_j w_ij (x̂_j - x̂_i)`` (into ``out`` when given)."""
        acc = torch.zeros_like(self.x_hat) if out is None else out.zero_()
        total = 0.0
        for j, w in self.weights.items():
            acc.add_(self.copies[j], alpha=w)
            total += w
        return acc.add_(self.x_hat, alpha=-total)

    def consensus_(self, x: torch.Tensor, workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x += gamma * sum_j w_ij (x̂_j - x̂_i)`` in place; returns ``x``."""
        if self.weights:
            x.add_(self.neighbour_term(workspace), alpha=self.gamma)
        return x

    def select(self, x: torch.Tensor, compressor: Compressor,
               workspace: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q = C(x - x̂_i)`` as ``(indices, values)``. First tells the compressor (``observe``) the
        neighbourhood mean at the previous selection's indices: ``(own value + what the d neighbours
        added to their copies there since) / (d + 1)`` — the gossip analogue of the
        all-reduce mean that RegTop-k's posterior uses (Top-k ignores it)."""
        if self.sent is not None:
            idx, val, before = self.sent
            d = len(self.weights)
            mean_at = (val + (self._nbr_at(idx) - before)) / (d + 1)
            compressor.observe(self.cstate, idx, val, mean_at, d + 1)
        diff = torch.sub(x.reshape(-1), self.x_hat, out=workspace)
        idx, val = compressor.compress(diff, self.cstate)
        idx = idx.to(torch.int64)
        self.sent = (idx, val.clone(), self._nbr_at(idx))
        return idx, val

    def _nbr_at(self, idx: torch.Tensor) -> torch.Tensor:
        """``sum_j x̂_j[idx]`` over the in-neighbours (k numbers)."""
        acc = torch.zeros(idx.numel(), dtype=self.x_hat.dtype)
        for j in self.weights:
            acc.add_(self.copies[j].index_select(0, idx))
        return acc

    def apply_own(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """``x̂_i += q`` (after sending ``q``)."""
        self.x_hat.index_add_(0, indices, values.to(self.x_hat.dtype))

    def apply_received(self, sender: int, indices: torch.Tensor, values: torch.Tensor) -> None:
        """``x̂_j += q_j`` for a message of in-neighbour ``sender``."""
        self.copies[sender].index_add_(0, indices, values.to(self.x_hat.dtype))

    # ------------------------------------------------------------------ state (tensors, JSON-able)
    def state_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {"x_hat": self.x_hat.clone(),
                                  "copies": [[int(j), c.clone()] for j, c in sorted(self.copies.items())],
                                  "gamma": self.gamma,
                                  "cstate": {k: v.clone() for k, v in self.cstate.items()}}
        if self.sent is not None:
            out["sent"] = [t.clone() for t in self.sent]
        return out

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore :meth:`state_dict` (the copies must name the same in-neighbours)."""
        copies = {int(j): torch.as_tensor(c) for j, c in state["copies"]}  # type: ignore[attr-defined]
        if sorted(copies) != sorted(self.copies):
            raise ValueError(f"checkpoint has copies of ranks {sorted(copies)}, this graph's "
                             f"in-neighbours are {sorted(self.copies)}")
        x_hat = torch.as_tensor(state["x_hat"])
        if x_hat.numel() != self.x_hat.numel():
            raise ValueError(f"checkpoint public copy has {x_hat.numel()} entries, "
                             f"the model {self.x_hat.numel()}")
        self.x_hat.copy_(x_hat.reshape(-1))
        for j, c in copies.items():
            self.copies[j].copy_(c.reshape(-1))
        self.cstate = {str(k): torch.as_tensor(v).clone()
                       for k, v in dict(state.get("cstate", {})).items()}  # type: ignore[call-overload]
        sent: List[torch.Tensor] = list(state.get("sent") or [])  # type: ignore[call-overload]
        self.sent = (sent[0].to(torch.int64), sent[1], sent[2]) if sent else None


def consensus_distance(xs: List[torch.Tensor]) -> float:
    """``max_i ||x_i - mean||_inf`` of a list of models (for tests and benchmarks)."""
    mean = torch.stack([x.reshape(-1).double() for x in xs]).mean(0)
    return max(float((x.reshape(-1).double() - mean).abs().max()) for x in xs)
