"""Compressed asynchronous gossip: CHOCO-SGD (:mod:`hpc_dgrab.comm.choco`) on the non-blocking
:class:`~hpc_dgrab.comm.gossip.GossipEngine`.

One iteration of a rank, never waiting for another rank::

    local optimizer step on x_i                                  (compute)
    absorb arrived messages: x̂_j += q_j                          (engine.poll, never waits)
    if every out-link is free (a gossip round):
        x_i += gamma * sum_j w_ij (x̂_j - x̂_i)                     (consensus on the public copies)
        q_i = C(x_i - x̂_i); x̂_i += q_i; push q_i                  (k indices + k values)
    else: no consensus step and nothing sent; the difference stays in x_i - x̂_i (error feedback)

The consensus step belongs to a round: applied on iterations that cannot push, the same
``x̂_j - x̂_i`` would be added again and again while ``x̂_i`` stands still, and ``x_i`` drifts
without bound (seen at 3-4 ranks on 2 cores, where a descheduled neighbour keeps links busy).

A push goes to ALL out-neighbours or to none (every neighbour's copy of ``x̂_i`` must see every
``q_i``), so the engine never merges pending messages. Staleness is the engine's (receiver's step
minus the sender's step at its push).

This is not push-sum: there is no mass. What stop/resume guarantees instead: after :meth:`finish`
(serve until every rank is done, then drain the engine), every rank's copy of ``x̂_j`` equals rank
``j``'s own ``x̂_j`` bit for bit, so a checkpoint written then restarts the same algorithm state.
With a doubly stochastic ``W``, every fixed point of the iteration has the network average at a
stationary point of the average loss; while messages are in flight, consensus steps on stale
copies move the average slightly (lock-step it is kept exactly).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, TypeVar

import torch
from torch import nn

from hpc_dgrab.comm.choco import ChocoState, decode, encode, mixing_weights
from hpc_dgrab.comm.gossip import GossipEngine, GossipMessage
from hpc_dgrab.compress.base import Compressor
from hpc_dgrab.optim.dasgd import StalenessMeter
from hpc_dgrab.optim.straggler import Straggler
from hpc_dgrab.tensors import flat_params, param_slices

log = logging.getLogger(__name__)

T = TypeVar("T")


class CompressedGossip:
    """One rank of compressed gossip SGD: ``model``, its ``optimizer``, a ``compressor`` and an
    engine whose messages hold ``2k`` elements (``k = compressor.k_for(numel)``). The same
    surface as :class:`~hpc_dgrab.optim.dasgd.DASGD` (``iterate``, ``finish``, ``average``,
    ``stats``, ``state_dict``), so :func:`hpc_dgrab.GossipOptimizer` runs either."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, engine: GossipEngine,
                 compressor: Compressor, gamma: float, straggler: Optional[Straggler] = None) -> None:
        self.model, self.optimizer, self.engine, self.compressor = model, optimizer, engine, compressor
        self.straggler = straggler or Straggler(1.0)
        x = flat_params(model)
        self.k = compressor.k_for(x.numel())
        if engine.numel != 2 * self.k or engine.dtype != x.dtype:
            raise ValueError(f"compressed gossip: the engine carries {engine.numel} {engine.dtype}, "
                             f"expected {2 * self.k} {x.dtype} (k={self.k})")
        self.x = x                                 # this rank's model, flat (the parameters' copy)
        self.state = ChocoState.start(x, mixing_weights(engine.topology, engine.rank), gamma)
        self._work = torch.empty_like(x)
        self._slices = param_slices(model)
        self.out_peers = engine.out_peers
        self.steps = 0
        self.staleness = StalenessMeter()
        self.window = StalenessMeter()
        self.merged = 0
        self.sent_pushes = 0
        self.compute_s = 0.0
        self.comm_s = 0.0
        self._done_comm = engine.comm.Dup()
        self._size = engine.comm.size
        self.finished = False
        self.served_pushes = 0

    @property
    def gamma(self) -> float:
        return self.state.gamma

    @property
    def weight(self) -> float:
        """Always 1 (no push-sum weight); for the same surface as DASGD."""
        return 1.0

    # ------------------------------------------------------------------ one iteration
    def iterate(self, local_step: Callable[[], T]) -> T:
        """``local_step()`` (gradient and optimizer step on the model), then :meth:`communicate`."""
        t0 = time.perf_counter()
        self.straggler.begin()
        out = local_step()
        self.compute_s += time.perf_counter() - t0
        self.straggler.end()
        self.steps += 1
        self.communicate()
        return out

    def communicate(self, step: Optional[int] = None) -> int:
        """Absorb arrivals; then, if every out-link is free, a consensus step and a compressed push.
        Returns the number of messages absorbed. Never waits."""
        t0 = time.perf_counter()
        merged = self.absorb(self.engine.poll())
        self._round(self.steps if step is None else step)
        self.comm_s += time.perf_counter() - t0
        return merged

    def _round(self, version: int) -> bool:
        """Consensus step and push when every out-link is free; else only advance the clock."""
        engine = self.engine
        if not self.out_peers:
            return False
        if len(engine.ready_peers(0)) < len(self.out_peers):
            engine.advance(version)
            return False
        self._load_x()
        self.state.consensus_(self.x, self._work)
        idx, val = self.state.select(self.x, self.compressor, self._work)
        buf = engine.message_buffer()
        encode(idx, val, buf)
        self.state.apply_own(idx, val)
        engine.push(buf, 1.0, version=version, step=0, peers=self.out_peers)
        self.sent_pushes += 1
        self._store_x()
        return True

    def _add(self, m: GossipMessage) -> None:
        idx, val = decode(m.data)
        self.state.apply_received(m.sender, idx, val)
        self.staleness.add(m.staleness)
        self.window.add(m.staleness)
        self.merged += 1

    def absorb(self, messages: List[GossipMessage]) -> int:
        for m in messages:
            self._add(m)
        return len(messages)

    def _load_x(self) -> None:
        x = self.x
        for p, o, n in self._slices:
            x[o:o + n].copy_(p.detach().reshape(-1))

    def _store_x(self) -> None:
        x = self.x
        for p, o, n in self._slices:
            p.detach().copy_(x[o:o + n].view(p.shape))

    def take_window(self) -> StalenessMeter:
        window, self.window = self.window, StalenessMeter()
        return window

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.x).all() and torch.isfinite(self.state.x_hat).all())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Model (flat), public copies, compressor state and step count (tensors + JSON values)."""
        self._load_x()
        return {"x": self.x.clone(), "steps": self.steps, "choco": self.state.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        x = torch.as_tensor(state["x"]).reshape(-1)
        if x.numel() != self.x.numel():
            raise ValueError(f"checkpoint model has {x.numel()} entries, this one {self.x.numel()}")
        self.x.copy_(x)
        self.state.load_state_dict(state["choco"])
        self.steps = int(state["steps"])
        self._store_x()

    # ------------------------------------------------------------------ the end
    def finish(self, serve_interval: Optional[float] = None,
               timeout: Optional[float] = None) -> Dict[str, Any]:
        """Collective: serve (absorb, and every ``serve_interval`` s a consensus step and a push,
        no gradient) until every rank has called it, then drain the engine: every copy is then
        exact (see the module docstring). ``timeout`` raises RuntimeError instead of waiting forever."""
        if self.finished:
            return self.stats()
        if serve_interval is None:
            serve_interval = max(1e-3, self.compute_s / max(1, self.steps))
        start = time.monotonic()
        req = self._done_comm.Ibarrier()
        last = time.monotonic()
        while not req.Test():
            self.absorb(self.engine.poll())
            if time.monotonic() - last >= serve_interval:
                self.communicate(step=self.steps + 1 + self.served_pushes)
                self.served_pushes += 1
                last = time.monotonic()
            if timeout is not None and time.monotonic() - start > timeout:
                raise RuntimeError(f"compressed gossip finish on rank {self.engine.rank} timed out after "
                                   f"{timeout} s waiting for the other ranks")
            time.sleep(min(serve_interval, 2e-3))
        remaining = None if timeout is None else max(1.0, timeout - (time.monotonic() - start))
        self.engine.close(timeout=remaining, deliver=self._add)
        self._done_comm.Free()
        self.finished = True
        return self.stats()

    def average(self, allreduce_: Optional[Callable[[torch.Tensor], Any]] = None) -> torch.Tensor:
        """Collective: the network-average model ``mean_i x_i`` (one all-reduce)."""
        if allreduce_ is None:
            from hpc_dgrab.comm.collectives import allreduce_ as default

            allreduce_ = default
        self._load_x()
        buf = self.x.to(torch.float64)
        allreduce_(buf)
        return (buf / self._size).to(self.x.dtype)

    def stats(self) -> Dict[str, Any]:
        """Engine counters plus steps, merged messages, staleness, k, gamma."""
        out = dict(self.engine.stats())
        out.update({"steps": self.steps, "merged": self.merged, "weight": 1.0, "k": self.k,
                    "gamma": self.gamma, "sent_pushes": self.sent_pushes,
                    "merged_staleness_avg": self.staleness.avg, "merged_staleness_max": self.staleness.max,
                    "compute_s": self.compute_s, "straggler_idle_s": self.straggler.idle_s,
                    "served_pushes": self.served_pushes})
        return out
