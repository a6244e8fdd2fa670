"""DASGD: decentralized asynchronous SGD over non-blocking push-sum gossip.

Every rank runs its own loop and never waits for another rank::

    grad on its own batch at its de-biased model x_i = z_i / w_i     (compute)
    local optimizer step on x_i;  z_i <- x_i * w_i                   (push-sum numerator)
    keep 1/(k+1) of (z_i, w_i), push the same share to each of its k current out-neighbours
    whose link is free (fewer than max_in_flight shares in flight; a busy link's share stays home)
    absorb whatever shares have arrived;  x_i <- z_i / w_i           (merge)

There is no barrier or collective inside the loop. The mass ``sum_i (z_i, w_i)`` moves only through
messages, so the network average ``sum z / sum w`` changes only by the ranks' gradient steps.
Staleness of a merged share = this rank's step count minus the sender's step count when it pushed
(the engine's definition); the DASGD bound depends on its average S_avg and maximum S_max.

End of training (:meth:`DASGD.finish`): a rank that has run its own steps posts a non-blocking
barrier and keeps *serving* — absorbing arrivals and pushing its mass back at most once per
``serve_interval`` seconds, without gradient steps — until every rank has posted it. Then the engine
drains (``close``): every
share in flight is absorbed, so the total mass is exact. The one collective at the end is the
all-reduce of ``[z | w]`` that gives the network-average model (:meth:`DASGD.average`).

Memory: the numerator ``z`` lives in the engine's message buffer (:meth:`GossipEngine.message_buffer`),
not in a tensor of its own; beyond the model, gradients and optimizer state a rank holds the
engine's buffers.

The gossip itself (``GossipEngine``, ``PushSum``) lives in :mod:`hpc_dgrab.comm.gossip`.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, TypeVar

import torch
from torch import nn

from hpc_dgrab.comm.gossip import GossipEngine, GossipMessage, PushSum
from hpc_dgrab.optim.straggler import Straggler
from hpc_dgrab.tensors import flat_params, param_slices

log = logging.getLogger(__name__)

T = TypeVar("T")


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


class _EnginePushSum(PushSum):
    """A :class:`PushSum` whose numerator ``z`` has no tensor of its own: it lives in the engine's
    unsent message buffer (:meth:`GossipEngine.message_buffer`, which the engine never touches) or,
    after a push, in the message just pushed (``sent``, read only; the engine writes a sent buffer
    again only after handing it out from ``message_buffer()``, i.e. at this object's next write).
    Reading ``x`` gives the writable tensor holding ``z`` (copied out of ``sent`` if need be)."""

    def __init__(self, engine: GossipEngine, x: torch.Tensor, weight: float = 1.0) -> None:
        self.engine = engine
        self.w = float(weight)
        self.sent: Optional[torch.Tensor] = None
        self._z = self._buffer()
        self._z.copy_(x)

    def _buffer(self) -> torch.Tensor:
        eng = self.engine
        return torch.empty(eng.numel, dtype=eng.dtype) if eng.closed else eng.message_buffer()

    def writable(self, keep: bool = True) -> torch.Tensor:
        """The tensor holding ``z`` that may be written (``keep=False``: its contents may be stale,
        for a caller that overwrites it whole)."""
        sent = self.sent
        if sent is not None:
            dst = self._buffer()
            if keep and dst.data_ptr() != sent.data_ptr():
                dst.copy_(sent)
            self._z, self.sent = dst, None
        return self._z

    @property
    def x(self) -> torch.Tensor:  # type: ignore[override]
        return self.writable()

    @property
    def numerator(self) -> torch.Tensor:
        """The tensor that holds ``z`` now (read only, no copy)."""
        return self.sent if self.sent is not None else self._z


class DASGD:
    """One rank of DASGD: a model, its local optimizer and a :class:`GossipEngine`.

    :meth:`iterate` is THE iteration (a local step, then :meth:`communicate`: push, merge);
    :meth:`step` runs it on a batch with ``loss_fn``; :class:`GossipOptimizer` runs it around the
    user's optimizer step. The pieces are public too — :meth:`compute`, :meth:`push`,
    :meth:`merge_arrived` — so a test can run them in lock-step.
    ``straggler`` (optional; for scripts and tests that drive DASGD directly — the trainer hooks its
    straggler around :meth:`step` instead) slows this rank's compute (:mod:`hpc_dgrab.optim.straggler`).
    ``when_busy``: what a push does for an out-neighbour whose link already has ``max_in_flight``
    shares in flight — ``"skip"`` (default): that share stays home (split among the free links only;
    no pending message, so no buffer for it and no merge pass); ``"queue"``: split among all current
    out-neighbours and let the engine merge the busy link's share into its pending message (sent,
    with the newest version, when the link frees).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
                 engine: GossipEngine,
                 straggler: Optional[Straggler] = None, when_busy: str = "skip") -> None:
        if when_busy not in ("skip", "queue"):
            raise ValueError(f"when_busy must be 'skip' or 'queue', got {when_busy!r}")
        self.when_busy = when_busy
        self.model, self.optimizer, self.loss_fn, self.engine = model, optimizer, loss_fn, engine
        self.straggler = straggler or Straggler(1.0)
        x = flat_params(model)
        if x.numel() != engine.numel or x.dtype != engine.dtype:
            raise ValueError(f"DASGD: model has {x.numel()} {x.dtype} parameters, the engine expects "
                             f"{engine.numel} {engine.dtype}")
        self.ps = _EnginePushSum(engine, x, 1.0)
        del x
        # (parameter, offset, numel): z <- params * w and params <- z / w in one pass each
        self._slices = param_slices(model)
        self.steps = 0
        self.staleness = StalenessMeter()
        self.window = StalenessMeter()     # since the last take_window() (per-epoch metrics)
        self.merged = 0
        self.compute_s = 0.0
        self.comm_s = 0.0                  # seconds in communicate()
        self._done_comm = engine.comm.Dup()  # for the one non-blocking barrier in finish()
        self.finished = False
        self.served_pushes = 0

    @property
    def weight(self) -> float:
        """This rank's push-sum weight."""
        return float(self.ps.w)

    # ------------------------------------------------------------------ one iteration
    def iterate(self, local_step: Callable[[], T]) -> T:
        """One DASGD iteration: ``local_step()`` (gradient and local optimizer step on the de-biased
        model; its value is returned), then push this rank's share and merge what has arrived."""
        out = self._local(local_step)
        self.communicate()
        return out

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One DASGD iteration on this rank's batch; returns the batch loss."""
        return self.iterate(lambda: self._gradient_step(x, y))

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The local half of :meth:`step` (gradient, optimizer step, ``z <- x * w``); returns the loss."""
        return self._local(lambda: self._gradient_step(x, y))

    def communicate(self) -> int:
        """The gossip half of an iteration: push a share, merge what has arrived (never waits);
        returns the number of messages merged."""
        t0 = time.perf_counter()
        self.push()
        merged = self.merge_arrived()
        self.comm_s += time.perf_counter() - t0
        return merged

    def _local(self, local_step: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        self.straggler.begin()
        out = local_step()
        self.load_numerator()
        self.compute_s += time.perf_counter() - t0
        self.straggler.end()
        self.steps += 1
        return out

    def _gradient_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        assert self.loss_fn is not None, "DASGD.step/compute need a loss_fn"
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)   # backward then writes .grad, no second gradient
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def load_numerator(self) -> None:
        """``z <- model parameters * w`` (after a local optimizer step on the de-biased model)."""
        z = self.ps.writable(keep=False)    # overwritten whole
        w = self.ps.w
        for p, o, n in self._slices:
            torch.mul(p.detach(), w, out=z[o:o + n].view(p.shape))

    def _store_model(self) -> None:
        """Model parameters <- ``z / w``."""
        z, w = self.ps.numerator, self.ps.w
        for p, o, n in self._slices:
            torch.div(z[o:o + n].view(p.shape), w, out=p.detach())

    def push(self, step: Optional[int] = None) -> int:
        """Keep 1/(k+1) of the mass and push the same share to each of the k out-neighbours of
        topology step ``step`` (default: this rank's step count) whose link is free (fewer than
        ``max_in_flight`` shares in flight, :meth:`GossipEngine.ready_peers`), without waiting;
        stamped with the step count. Returns k; with k = 0 nothing moves (the mass stays home).
        With ``when_busy="queue"`` k is every out-neighbour (busy ones get the share as pending).

        The share is written straight into the engine's message buffer (no snapshot copy); the
        kept share is that same message until something is absorbed or ``ps.x`` is read.
        """
        step = self.steps if step is None else step
        ps, engine = self.ps, self.engine
        if self.when_busy == "skip":
            peers: Optional[List[int]] = engine.ready_peers(step)
            if not peers:
                engine.advance(self.steps)
                return 0
            k = len(peers)
        else:
            peers, k = None, engine.out_degree(step)
        share = 1.0 / (k + 1)
        buf = engine.message_buffer()
        torch.mul(ps.numerator, share, out=buf)   # the same bits as ps.split's in-place multiply
        ps.sent = ps._z = buf
        ps.w *= share
        engine.push(buf, ps.w, version=self.steps, step=step, peers=peers)
        return k

    def _add(self, m: GossipMessage) -> None:
        """Add one received share to ``(z, w)`` (not yet to the model)."""
        ps = self.ps
        sent = ps.sent
        z = ps.writable(keep=False)
        data = m.data if m.data.dtype == z.dtype else m.data.to(z.dtype)
        if sent is not None:                # z = kept share + this one, in one pass
            torch.add(sent, data, out=z)
        else:
            z.add_(data)
        ps.w += float(m.weight)
        self.staleness.add(m.staleness)
        self.window.add(m.staleness)
        self.merged += 1

    def absorb(self, messages: List[GossipMessage]) -> int:
        """Merge received shares into the push-sum state and the model; returns how many."""
        if not messages:  # a split alone does not change z / w
            return 0
        for m in messages:
            self._add(m)
        self._store_model()
        return len(messages)

    def take_window(self) -> StalenessMeter:
        """The staleness of the shares merged since the previous call (and start a new window)."""
        window, self.window = self.window, StalenessMeter()
        return window

    def merge_arrived(self) -> int:
        """Absorb whatever has arrived (never waits); returns the number of messages."""
        return self.absorb(self.engine.poll())

    def is_finite(self) -> bool:
        """Whether the push-sum numerator holds only finite numbers."""
        return bool(torch.isfinite(self.ps.numerator).all())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The push-sum state: numerator ``x``, weight ``w`` and the step count."""
        return {"x": self.ps.x.clone(), "w": float(self.ps.w), "steps": self.steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values; the model becomes ``x / w``."""
        self.ps.x.copy_(torch.as_tensor(state["x"]))
        self.ps.w = float(state["w"])
        self.steps = int(state["steps"])
        self._store_model()

    # ------------------------------------------------------------------ the end
    def finish(self, serve_interval: Optional[float] = None,
               timeout: Optional[float] = None) -> Dict[str, Any]:
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
                if self.push(step=self.steps + 1 + self.served_pushes):
                    owed = False      # else every link is busy: try again next round
                last_push = time.monotonic()
                self.served_pushes += 1
            if timeout is not None and time.monotonic() - start > timeout:
                raise RuntimeError(f"DASGD finish on rank {self.engine.rank} timed out after {timeout} s "
                                   "waiting for the other ranks")
            time.sleep(min(serve_interval, 2e-3))
        remaining = None if timeout is None else max(1.0, timeout - (time.monotonic() - start))
        before = self.merged
        self.engine.close(timeout=remaining, deliver=self._add)   # merged where they land, no copies
        if self.merged > before:
            self._store_model()
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
