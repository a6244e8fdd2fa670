"""DASGD: decentralized asynchronous SGD over non-blocking push-sum gossip (ALGORITHMS.md section 5).

Every rank runs its own loop and never waits for another rank::

    grad on its own batch at its de-biased model x_i = z_i / w_i     (compute)
    local optimizer step on x_i;  z_i <- x_i * w_i                   (push-sum numerator)
    keep 1/(d+1) of (z_i, w_i), push the same share to each of its d current out-neighbours
    absorb whatever shares have arrived;  x_i <- z_i / w_i           (merge)

There is no barrier or collective inside the loop. The mass ``sum_i (z_i, w_i)`` moves only through
messages, so the network average ``sum z / sum w`` changes only by the ranks' gradient steps.
Staleness of a merged share = this rank's step count minus the sender's step count when it pushed
(the engine's definition); the DASGD bound depends on its average S_avg and maximum S_max.

End of training (:meth:`DASGD.finish`): a rank that has run its own steps posts a non-blocking
barrier and keeps *serving* — absorbing arrivals and pushing its mass back at most once per
``serve_interval`` seconds, without gradient steps — until every rank has posted it. Without this,
a late rank would keep pushing its mass into finished neighbours that never send any back and its
weight would decay geometrically (to float underflow). Then the engine drains (``close``): every
share in flight is absorbed, so the total mass is exact. The one collective at the end is the
all-reduce of ``[z | w]`` that gives the network-average model (:meth:`DASGD.average`).

Memory traffic of one step's communication part (:meth:`DASGD.push` + :meth:`DASGD.merge_arrived`):
the share ``z / (d+1)`` is written straight into the engine's :meth:`GossipEngine.message_buffer`
(one pass, no snapshot copy); the kept share *is* that message, so ``z`` is not rewritten — the
first share absorbed is added to it out of place (``z <- message + received``, one pass) and the
model is set to ``z / w`` parameter by parameter (one pass, no temporary). The numerator reads
``ps.x`` give are the same bits as splitting and absorbing on ``ps.x`` itself (same operations in
the same order), so the mass stays exactly where it was.

The gossip itself (``GossipEngine``, ``PushSum``) lives in :mod:`hpc_dgrab.comm.gossip`.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from hpc_dgrab.comm.gossip import GossipEngine, GossipMessage, PushSum
from hpc_dgrab.tensors import flat_params
from hpc_dgrab.optim.straggler import Straggler

log = logging.getLogger(__name__)


class StalenessMeter:
    """Running staleness statistics of merged messages (negative staleness counts as 0)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.max = 0

    def add(self, staleness: int) -> None:
        s = max(0, int(staleness))
        self.count += 1
        self.total += s
        self.max = max(self.max, s)

    @property
    def avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    def snapshot(self) -> Dict[str, float]:
        return {"count": self.count, "total": self.total, "max": self.max}


class _SentPushSum(PushSum):
    """A :class:`PushSum` whose numerator may still sit, bit for bit, in the message just pushed
    (``sent``, an engine buffer the engine does not write before the next push); reading ``x``
    copies it back first."""

    def __init__(self, x: torch.Tensor, weight: float = 1.0) -> None:
        self._x = x
        self.w = float(weight)
        self.sent: Optional[torch.Tensor] = None

    @property
    def x(self) -> torch.Tensor:  # type: ignore[override]
        if self.sent is not None:
            self._x.copy_(self.sent)
            self.sent = None
        return self._x

    @property
    def numerator(self) -> torch.Tensor:
        """The tensor that holds ``z`` now (``x`` or the pushed message); read only, no copy."""
        return self.sent if self.sent is not None else self._x


class DASGD:
    """One rank of DASGD: a model, its local optimizer and a :class:`GossipEngine`.

    ``step(x, y)`` is one iteration (compute, push, merge). The pieces are public too —
    :meth:`compute`, :meth:`push`, :meth:`merge_arrived` — so a test can run them in lock-step.
    ``straggler`` (optional; for scripts and tests that drive DASGD directly — the trainer hooks its
    straggler around :meth:`step` instead) slows this rank's compute (:mod:`hpc_dgrab.optim.straggler`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], engine: GossipEngine,
                 straggler: Optional[Straggler] = None) -> None:
        self.model, self.optimizer, self.loss_fn, self.engine = model, optimizer, loss_fn, engine
        self.straggler = straggler or Straggler(1.0)
        x = flat_params(model)
        if x.numel() != engine.numel or x.dtype != engine.dtype:
            raise ValueError(f"DASGD: model has {x.numel()} {x.dtype} parameters, the engine expects "
                             f"{engine.numel} {engine.dtype}")
        self.ps = _SentPushSum(x, 1.0)
        # (parameter, its slice of z shaped like it): z <- params * w and params <- z / w in one pass each
        self._slices = []
        offset = 0
        for p in model.parameters():
            if p.requires_grad:
                self._slices.append((p, x[offset:offset + p.numel()].view(p.shape)))
                offset += p.numel()
        self.steps = 0
        self.staleness = StalenessMeter()
        self.window = StalenessMeter()     # since the last take_window() (per-epoch metrics)
        self.merged = 0
        self.compute_s = 0.0
        self._done_comm = engine.comm.Dup()  # for the one non-blocking barrier in finish()
        self.finished = False
        self.served_pushes = 0

    # ------------------------------------------------------------------ one iteration
    def compute(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Gradient at the de-biased model and one local optimizer step; returns the batch loss."""
        t0 = time.perf_counter()
        self.straggler.begin()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.load_numerator()
        self.compute_s += time.perf_counter() - t0
        self.straggler.end()
        self.steps += 1
        return float(loss.detach())

    def load_numerator(self) -> None:
        """``z <- model parameters * w`` (after a local optimizer step on the de-biased model)."""
        ps = self.ps
        ps.sent = None                      # z is overwritten whole
        w = ps.w
        for p, z in self._slices:
            torch.mul(p.detach(), w, out=z)

    def _store_model(self) -> None:
        """Model parameters <- ``z / w``."""
        w = self.ps.w
        for p, z in self._slices:
            torch.div(z, w, out=p.detach())

    def push(self, step: Optional[int] = None) -> None:
        """Keep 1/(d+1) of the mass, push the same share to each out-neighbour of topology step
        ``step`` (default: this rank's step count) without waiting; stamped with the step count.

        The share is written straight into the engine's message buffer (no snapshot copy); the
        kept share is that same message until something is absorbed or ``ps.x`` is read.
        """
        step = self.steps if step is None else step
        ps, engine = self.ps, self.engine
        share = 1.0 / (engine.out_degree(step) + 1)
        buf = engine.message_buffer()
        torch.mul(ps.numerator, share, out=buf)   # the same bits as ps.split's in-place multiply
        ps.sent = buf
        ps.w *= share
        engine.push(buf, ps.w, version=self.steps, step=step)

    def absorb(self, messages: List[GossipMessage]) -> int:
        """Merge received shares into the push-sum state and the model; returns how many."""
        if not messages:  # a split alone does not change z / w
            return 0
        ps = self.ps
        z = ps._x
        for m in messages:
            data = m.data if m.data.dtype == z.dtype else m.data.to(z.dtype)
            if ps.sent is not None:         # z = kept share + this one, in one pass
                torch.add(ps.sent, data, out=z)
                ps.sent = None
            else:
                z.add_(data)
            ps.w += float(m.weight)
            self.staleness.add(m.staleness)
            self.window.add(m.staleness)
        self.merged += len(messages)
        self._store_model()
        return len(messages)

    def take_window(self) -> StalenessMeter:
        """The staleness of the shares merged since the previous call (and start a new window)."""
        window, self.window = self.window, StalenessMeter()
        return window

    def merge_arrived(self) -> int:
        """Absorb whatever has arrived (never waits); returns the number of messages."""
        return self.absorb(self.engine.poll())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One DASGD iteration on this rank's batch; returns the batch loss."""
        loss = self.compute(x, y)
        self.push()
        self.merge_arrived()
        return loss

    # ------------------------------------------------------------------ the end
    def finish(self, serve_interval: Optional[float] = None, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Serve until every rank has finished its steps, then drain the gossip (see module docstring).

        ``serve_interval`` (default: this rank's mean compute time per step, at least 1 ms) bounds
        how often a finished rank pushes while others still train. ``timeout`` (seconds, for tests)
        raises ``RuntimeError`` instead of waiting forever. Returns :meth:`stats`.
        """
        if self.finished:
            return self.stats()
        if serve_interval is None:
            serve_interval = max(1e-3, self.compute_s / max(1, self.steps))
        start = time.monotonic()
        req = self._done_comm.Ibarrier()
        last_push = time.monotonic()
        owed = False  # received mass not yet passed on
        while not req.Test():
            owed = self.merge_arrived() > 0 or owed
            if owed and time.monotonic() - last_push >= serve_interval:
                # a time-varying graph keeps cycling through its phases while serving
                self.push(step=self.steps + 1 + self.served_pushes)
                last_push = time.monotonic()
                self.served_pushes += 1
                owed = False
            if timeout is not None and time.monotonic() - start > timeout:
                raise RuntimeError(f"DASGD finish on rank {self.engine.rank} timed out after {timeout} s "
                                   "waiting for the other ranks")
            time.sleep(min(serve_interval, 2e-3))
        remaining = None if timeout is None else max(1.0, timeout - (time.monotonic() - start))
        self.absorb(self.engine.close(timeout=remaining))
        self._done_comm.Free()
        self.finished = True
        log.debug("rank %d finished: %d steps, %d serving pushes, weight %.4g",
                  self.engine.rank, self.steps, self.served_pushes, self.ps.w)
        return self.stats()

    def average(self, allreduce_: Optional[Callable[[torch.Tensor], Any]] = None) -> torch.Tensor:
        """Collective: the network-average model ``sum_i z_i / sum_i w_i`` (one all-reduce)."""
        if allreduce_ is None:
            from hpc_dgrab.comm.collectives import allreduce_ as default

            allreduce_ = default
        buf = torch.cat([self.ps.x.reshape(-1).to(torch.float64),
                         torch.tensor([self.ps.w], dtype=torch.float64)])
        allreduce_(buf)
        return (buf[:-1] / buf[-1]).to(self.ps.x.dtype)

    def stats(self) -> Dict[str, Any]:
        """Engine counters plus this driver's: steps, merged messages, staleness, push-sum weight."""
        out = dict(self.engine.stats())
        out.update({"steps": self.steps, "merged": self.merged, "weight": self.ps.w,
                    "merged_staleness_avg": self.staleness.avg, "merged_staleness_max": self.staleness.max,
                    "compute_s": self.compute_s, "straggler_idle_s": self.straggler.idle_s,
                    "served_pushes": self.served_pushes})
        return out
