"""Non-blocking gossip for decentralized asynchronous SGD (push-sum).

* :class:`PushSum` — pure torch: numerator ``x`` and weight ``w``; ``split(d)`` keeps
  ``1/(d+1)`` of the mass and returns each out-neighbour's share; ``absorb`` adds a received
  share; ``value()`` is ``x / w``. Correct on directed, time-varying graphs.
* :class:`GossipEngine` — the wire, over the point-to-point half of a private
  :class:`~hpc_dgrab.comm.mpi.MPITransport`: ``push`` snapshots a tensor and starts sends to the
  out-neighbours, ``poll`` returns what has arrived (never waits), ``close`` drains. No barrier or
  collective inside a step.

Loop (default, copy-free): ``buf = eng.message_buffer()``, write the share into ``buf``,
``eng.push(buf, w, version=step)``; or ``share, w = ps.split(eng.out_degree(step));
eng.push(share, w, version=step)`` (copies: ``share`` may change now); then
``ps.absorb(m.data, m.weight)`` for every ``m`` of ``eng.poll()``; at the end the same for every
``m`` of ``eng.close()``.

Contract:

* Message: one byte buffer, a 40-byte header ``[kind, sender, version, seq]`` (int64) + ``weight``
  (float64), then ``numel`` elements of ``dtype``; one tag. Sends are synchronous-mode (persistent,
  one per message buffer and peer), so "in flight" means "not yet received": at most
  ``max_in_flight`` per out-neighbour. Beyond that a snapshot waits in ONE pending slot per
  neighbour; a newer push replaces it (``replacements``): ``merge="add"`` sums them (push-sum mass
  stays exact), ``merge="replace"`` keeps the newest. Receives: ``receive_slots`` persistent
  receives per in-neighbour. Messages from one sender arrive in send order.
* ``message_buffer()`` / ``push(buf)`` sends without the snapshot copy (``buf`` is the engine's
  until sent). This copy-free path is gossip's default: DASGD and compressed gossip
  (:mod:`hpc_dgrab.optim.choco_gossip`) write their message into it; ``push(tensor)`` of any other
  tensor takes a snapshot copy first.
* ``close()`` flushes the pending slots, sends each possible out-neighbour a FIN with its data
  count, and receives until every possible in-neighbour's FIN and announced count are in; it blocks
  until the in-neighbours close too. After ``close()`` on all ranks (and absorbing what it
  returned) the push-sum mass is conserved up to rounding. Ranks may run different step counts.
* Progress happens inside the engine's calls: a rank that computes long between them delays its
  own transfers, never its neighbours' steps.
* Staleness of a received message = receiver's version - message's version; ``staleness_avg`` /
  ``staleness_max`` clamp it at 0.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from hpc_dgrab import runtime
from hpc_dgrab.comm import wire
from hpc_dgrab.comm.mpi import MPITransport
from hpc_dgrab.comm.topology import Topology
from hpc_dgrab.comm.transport import Request

log = logging.getLogger(__name__)

HEADER_BYTES = 40
_DATA, _FIN = 1, 2
_TAG = 0x6055


# =============================================================================== pure numerics
class PushSum:
    """Push-sum state: numerator ``x`` (a tensor, updated in place) and scalar weight ``w``."""

    def __init__(self, x: torch.Tensor, weight: float = 1.0) -> None:
        self.x = x
        self.w = float(weight)

    def split(self, out_degree: int) -> Tuple[torch.Tensor, float]:
        """Keep ``1/(out_degree+1)`` of the mass; return the share for EACH out-neighbour.

        The returned tensor is ``self.x`` itself (already scaled): push it (the engine copies it)
        before changing ``self.x`` again.
        """
        share = 1.0 / (int(out_degree) + 1)
        self.x.mul_(share)
        self.w *= share
        return self.x, self.w

    def absorb(self, numerator: torch.Tensor, weight: float) -> None:
        """Add a received share."""
        self.x.add_(numerator.to(self.x.dtype))
        self.w += float(weight)

    def value(self) -> torch.Tensor:
        """The de-biased estimate ``x / w`` (a new tensor)."""
        return self.x / self.w


# =============================================================================== MPI engine
class _Buffer:
    """One message buffer: header + data views onto a single byte array; ``refs`` = users;
    ``sends``: this buffer's persistent synchronous-send request per peer (created on first use)."""

    __slots__ = ("raw", "head", "weight_view", "data", "refs", "sends")

    def __init__(self, numel: int, np_dtype: np.dtype) -> None:
        self.raw = np.empty(HEADER_BYTES + numel * np_dtype.itemsize, dtype=np.uint8)
        self.head = self.raw[:32].view(np.int64)
        self.weight_view = self.raw[32:40].view(np.float64)
        self.data = torch.from_numpy(self.raw[HEADER_BYTES:].view(np_dtype))
        self.refs = 0
        self.sends: Dict[int, Request] = {}

    def free_requests(self, free: Callable[[Request], None]) -> None:
        for req in self.sends.values():
            free(req)
        self.sends = {}


@dataclass
class GossipMessage:
    """One received share. ``data`` from :meth:`GossipEngine.poll` is a view valid until the next
    ``poll()``/``close()`` call (merge or copy it before); from ``close()`` it is a copy."""

    sender: int
    version: int
    weight: float
    data: torch.Tensor
    staleness: int          # receiver's version - sender's version (may be negative)


class GossipEngine:
    """Non-blocking neighbour exchange on ``topology`` for tensors of ``numel`` elements of ``dtype``.

    Parameters: ``comm`` (default ``MPI.COMM_WORLD``; duplicated once, collectively, here),
    ``max_in_flight`` (data sends per out-neighbour not yet received), ``receive_slots`` (posted
    receive buffers per in-neighbour; more lets one ``poll()`` take several messages of one
    neighbour at the cost of a message of memory each), ``merge`` ("add": pending messages are
    summed — push-sum; "replace": the newest snapshot overwrites the pending one).
    ``topology.n`` must equal the communicator size. See the module docstring for the protocol.
    """

    def __init__(self, topology: Topology, numel: int, dtype: torch.dtype = torch.float32,
                 comm: Optional[Any] = None, max_in_flight: int = 2, merge: str = "add",
                 receive_slots: int = 1) -> None:
        base = comm if comm is not None else runtime.world()
        if topology.n != base.size:
            raise ValueError(f"topology has {topology.n} ranks but the communicator has {base.size}")
        try:
            self._np_dtype = wire.float_type(dtype, "gossip").numpy
        except ValueError:
            raise ValueError(f"gossip supports float16/32/64 tensors, not {dtype}") from None
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if receive_slots < 1:
            raise ValueError(f"receive_slots must be >= 1, got {receive_slots}")
        if merge not in ("add", "replace"):
            raise ValueError(f"merge must be 'add' or 'replace', got {merge!r}")
        self._t = MPITransport(base, progress="inline")       # a private duplicate of comm
        # the transport's own request functions, bound once (the hot path calls them directly)
        self._start, self._testsome = self._t.start, self._t.testsome
        self.topology = topology
        self.numel = int(numel)
        self.dtype = dtype
        self.max_in_flight = int(max_in_flight)
        self.merge = merge
        self.comm = self._t.comm
        self.rank = self._t.rank
        self.out_peers = topology.all_out_neighbors(self.rank)
        self.in_peers = topology.all_in_neighbors(self.rank)
        self.msg_bytes = HEADER_BYTES + self.numel * self._np_dtype.itemsize
        self.version = 0
        self.closed = False
        self._pushes = 0
        self._free: List[_Buffer] = []
        self._free_limit = len(self.out_peers) * (self.max_in_flight + 1) + 2
        self._claimed: Optional[_Buffer] = None      # handed out by message_buffer(), not yet pushed
        self._peers_at: Dict[int, List[int]] = {}     # out-neighbours per phase of the period
        # sends (active requests only)
        self._sreqs: List[Request] = []
        self._smeta: List[Tuple[int, Optional[_Buffer]]] = []
        self._inflight: Dict[int, int] = {p: 0 for p in self.out_peers}
        self._pending: Dict[int, Optional[_Buffer]] = {p: None for p in self.out_peers}
        self._npending = 0
        self._sent: Dict[int, int] = {p: 0 for p in self.out_peers}
        # receives: receive_slots persistent receives per in-neighbour, one fixed list
        self._rreqs: List[Request] = []
        self._rslots: List[Tuple[int, _Buffer]] = []
        self._ractive: List[bool] = []
        self._held: List[int] = []
        self._received: Dict[int, int] = {p: 0 for p in self.in_peers}
        self._fin: Dict[int, int] = {}
        for p in self.in_peers:
            for _ in range(int(receive_slots)):
                buf = _Buffer(self.numel, self._np_dtype)
                req = self._t.recv_init(buf.raw, p, _TAG)
                self._start(req)
                self._rreqs.append(req)
                self._rslots.append((p, buf))
                self._ractive.append(True)
        # counters
        self.messages_sent = self.bytes_sent = 0
        self.messages_received = self.bytes_received = 0
        self.replacements = 0
        self.skipped_pushes = 0
        self._stale_sum = self._stale_count = self._stale_max = 0
        self._close_messages = 0

    # ------------------------------------------------------------------ helpers
    def out_degree(self, step: int = 0) -> int:
        """Number of out-neighbours at ``step`` (for the push-sum share ``1/(d+1)``)."""
        return self.topology.out_degree(self.rank, step)

    def out_neighbors(self, step: int = 0) -> List[int]:
        return self.topology.out_neighbors(self.rank, step)

    def in_neighbors(self, step: int = 0) -> List[int]:
        return self.topology.in_neighbors(self.rank, step)

    def _buffer(self) -> _Buffer:
        return self._free.pop() if self._free else _Buffer(self.numel, self._np_dtype)

    def _release(self, buf: _Buffer) -> None:
        buf.refs -= 1
        if buf.refs == 0:
            if len(self._free) < self._free_limit:
                self._free.append(buf)
            else:
                buf.free_requests(self._t.free)

    def _isend(self, peer: int, buf: _Buffer) -> None:
        req = buf.sends.get(peer)
        if req is None:
            req = buf.sends[peer] = self._t.send_init(buf.raw, peer, _TAG)
        self._start(req)
        self._sreqs.append(req)
        self._smeta.append((peer, buf))
        self._inflight[peer] += 1
        self._sent[peer] += 1
        self.messages_sent += 1
        self.bytes_sent += self.msg_bytes

    def _progress_sends(self) -> None:
        """Retire completed sends, then post pending snapshots where a slot became free."""
        if self._sreqs:
            done = self._testsome(self._sreqs)
            if done:
                for i in done:
                    peer, buf = self._smeta[i]
                    if buf is not None:
                        self._inflight[peer] -= 1
                        self._release(buf)
                if len(done) == len(self._sreqs):
                    self._sreqs, self._smeta = [], []
                else:
                    finished = set(done)
                    keep = [i for i in range(len(self._sreqs)) if i not in finished]
                    self._sreqs = [self._sreqs[i] for i in keep]
                    self._smeta = [self._smeta[i] for i in keep]
        if self._npending:
            for peer, buf in self._pending.items():
                if buf is not None and self._inflight[peer] < self.max_in_flight:
                    self._pending[peer] = None
                    self._npending -= 1
                    self._isend(peer, buf)

    def _take_pending(self, peer: int, new: _Buffer) -> None:
        """``new`` (one reference held for ``peer``) must wait: put it in / merge it into pending."""
        old = self._pending[peer]
        if old is None:
            self._pending[peer] = new
            self._npending += 1
            return
        self.replacements += 1
        if self.merge == "replace":
            self._release(old)
            self._pending[peer] = new
            return
        if old.refs == 1:                 # exclusively this peer's: add in place
            merged = old
        else:                             # shared with other peers' sends: private copy
            merged = self._buffer()
            merged.refs = 1
            merged.raw[:] = old.raw
            self._release(old)
        merged.data.add_(new.data)
        merged.weight_view[0] += new.weight_view[0]
        merged.head[2] = new.head[2]      # newest version
        merged.head[3] = new.head[3]
        self._release(new)
        self._pending[peer] = merged

    def _account(self, src: int, buf: _Buffer) -> GossipMessage:
        head = buf.head
        version = int(head[2])
        stale = self.version - version
        self._received[src] += 1
        self.messages_received += 1
        self.bytes_received += self.msg_bytes
        clamped = stale if stale > 0 else 0
        self._stale_sum += clamped
        self._stale_count += 1
        if clamped > self._stale_max:
            self._stale_max = clamped
        return GossipMessage(int(head[1]), version, float(buf.weight_view[0]), buf.data, stale)

    def _receive(self, hold: bool,
                 deliver: Optional[Callable[[GossipMessage], Any]] = None) -> List[GossipMessage]:
        """Collect completed receives, sorted by (sender, send order). ``hold``: hand out views and
        keep their buffers until the next call; else ``deliver`` each view (then restart at once)
        or, without ``deliver``, copy the data and restart at once."""
        done = self._testsome(self._rreqs) if self._rreqs else None
        if not done:
            return []
        out: List[Tuple[int, int, GossipMessage, int]] = []
        for i in done:
            self._ractive[i] = False
            src, buf = self._rslots[i]
            kind = int(buf.head[0])
            if kind == _FIN:
                if src in self._fin:
                    raise RuntimeError(f"gossip: second FIN from rank {src}")
                self._fin[src] = int(buf.head[2])
                continue
            if kind != _DATA or int(buf.head[1]) != src:
                raise RuntimeError(f"gossip: corrupt message from rank {src} (kind {kind})")
            msg = self._account(src, buf)
            if hold:
                self._held.append(i)
            elif deliver is None:
                msg.data = msg.data.clone()
                self._repost(i)
            out.append((src, int(buf.head[3]), msg, i))
        if len(out) > 1:
            out.sort(key=lambda t: (t[0], t[1]))
        if deliver is not None and not hold:
            for _, _, m, i in out:
                deliver(m)
                self._repost(i)
        return [m for _, _, m, _ in out]

    def _repost(self, i: int) -> None:
        if self._rslots[i][0] not in self._fin:      # nothing more comes after a FIN
            self._start(self._rreqs[i])
            self._ractive[i] = True

    def _repost_held(self) -> None:
        for i in self._held:
            self._repost(i)
        self._held = []

    def _peers(self, step: int) -> List[int]:
        phase = step % self.topology.period
        peers = self._peers_at.get(phase)
        if peers is None:
            peers = self._peers_at[phase] = self.topology.out_neighbors(self.rank, step)
        return peers

    # ------------------------------------------------------------------ public API
    def message_buffer(self) -> torch.Tensor:
        """The engine-owned tensor (``numel`` elements) the next :meth:`push` sends from, without a
        snapshot copy (write the message into it, then ``push(buf, ...)``; do not touch it after)."""
        if self.closed:
            raise RuntimeError("gossip engine is closed")
        if self._claimed is None:
            self._claimed = self._buffer()
        return self._claimed.data

    def ready_peers(self, step: int = 0) -> List[int]:
        """The out-neighbours at ``step`` with fewer than ``max_in_flight`` sends in flight and none
        pending (completed sends are retired first): push-sum may split its mass among these only
        and ``push(..., peers=...)`` (a busy link's share stays home); none ready: :meth:`advance`."""
        self._progress_sends()
        inflight, pending, bound = self._inflight, self._pending, self.max_in_flight
        return [p for p in self._peers(step) if inflight[p] < bound and pending[p] is None]

    def advance(self, version: int) -> None:
        """Set this rank's clock (:attr:`version`, for staleness) without sending anything."""
        if self.closed:
            raise RuntimeError("gossip engine is closed")
        self.version = int(version)
        self.skipped_pushes += 1

    def push(self, tensor: torch.Tensor, weight: float = 1.0, version: Optional[int] = None,
             step: Optional[int] = None, peers: Optional[List[int]] = None) -> None:
        """Snapshot ``tensor`` (``numel`` elements) and start sending it to the out-neighbours.

        Every out-neighbour at ``step`` (default ``version``) receives the same ``(tensor, weight)``
        (for push-sum: the share from :meth:`PushSum.split`). ``version`` (default: number of
        previous pushes) is this rank's clock: it becomes :attr:`version` and is stamped on the
        message for staleness. Returns at once; the caller may modify ``tensor`` immediately
        (except the tensor of :meth:`message_buffer`, which is sent without a copy). ``peers``
        (a subset of the out-neighbours at ``step``, e.g. :meth:`ready_peers`) sends to those only.
        """
        if self.closed:
            raise RuntimeError("gossip engine is closed")
        claimed = self._claimed
        own = claimed is not None and tensor is claimed.data
        if not own and tensor.numel() != self.numel:
            raise ValueError(f"push: expected {self.numel} elements, got {tensor.numel()}")
        version = self._pushes if version is None else int(version)
        step = version if step is None else int(step)
        self.version = version
        self._pushes += 1
        self._progress_sends()
        if peers is None:
            peers = self._peers(step)
        if not peers:
            return
        if claimed is not None and own:
            buf, self._claimed = claimed, None
        else:
            buf = self._buffer()
            buf.data.copy_(tensor.detach().reshape(-1))
        head = buf.head
        head[0], head[1], head[2], head[3] = _DATA, self.rank, version, self._pushes
        buf.weight_view[0] = weight
        buf.refs = len(peers)
        for peer in peers:
            if self._inflight[peer] < self.max_in_flight and self._pending[peer] is None:
                self._isend(peer, buf)
            else:
                self._take_pending(peer, buf)

    def poll(self) -> List[GossipMessage]:
        """Messages that arrived since the last call (sorted by sender, then send order); never
        waits. Each message's ``data`` is a view valid until the next ``poll()`` / ``close()``."""
        if self.closed:
            raise RuntimeError("gossip engine is closed")
        if self._held:
            self._repost_held()
        self._progress_sends()
        return self._receive(hold=True)

    def close(self, timeout: Optional[float] = None,
              deliver: Optional[Callable[[GossipMessage], Any]] = None) -> List[GossipMessage]:
        """Drain: flush pending sends, exchange FINs, receive everything still in flight; returns
        the data messages received meanwhile (copies). With ``deliver``, each is handed to
        ``deliver(msg)`` instead (``data`` a view valid during the call) and the list is empty.
        Blocks until every in-neighbour closes too; ``timeout`` (s) raises RuntimeError instead."""
        if self.closed:
            return []
        self._repost_held()
        out: List[GossipMessage] = []
        drained = 0
        fin_sent = False
        start = time.monotonic()
        fin_heads: List[np.ndarray] = []
        while True:
            self._progress_sends()
            if not fin_sent and all(b is None for b in self._pending.values()):
                for peer in self.out_peers:
                    fin = np.zeros(HEADER_BYTES, dtype=np.uint8)
                    fin[:32].view(np.int64)[:] = (_FIN, self.rank, self._sent[peer], -1)
                    fin_heads.append(fin)
                    self._sreqs.append(self._t.issend(fin, peer, _TAG))
                    self._smeta.append((peer, None))
                fin_sent = True
            got = self._receive(hold=False, deliver=deliver)
            drained += len(got)
            if deliver is None:
                out.extend(got)
            # A FIN can complete before a large data message matched ahead of it (rendezvous): done
            # only when every in-neighbour's FIN has come AND as many messages as it says it sent.
            if fin_sent and not self._sreqs and len(self._fin) == len(self.in_peers) \
                    and all(self._received[s] == self._fin[s] for s in self.in_peers):
                break
            if timeout is not None and time.monotonic() - start > timeout:
                raise RuntimeError(f"gossip close on rank {self.rank} timed out after {timeout} s: "
                                   f"FIN from {sorted(self._fin)} of {self.in_peers}, "
                                   f"{len(self._sreqs)} sends open, received/announced "
                                   f"{ {s: (self._received[s], self._fin.get(s)) for s in self.in_peers} }")
            if not got:
                time.sleep(20e-6)          # yield the core to ranks that still compute
        del fin_heads
        active = [req for req, on in zip(self._rreqs, self._ractive) if on]
        for req in active:                 # receives that can never match (their source sent FIN)
            self._t.cancel(req)
        if active:
            self._t.waitall(active)
        for req in self._rreqs:
            self._t.free(req)
        self._rreqs, self._rslots, self._ractive = [], [], []
        for buf in self._free + ([self._claimed] if self._claimed is not None else []):
            buf.free_requests(self._t.free)
        self._free, self._claimed = [], None
        bad = {s: (self._received[s], self._fin[s]) for s in self.in_peers
               if self._received[s] != self._fin[s]}
        if bad:
            raise RuntimeError(f"gossip close on rank {self.rank}: received/sent counts differ {bad}")
        self._close_messages = drained
        self.closed = True
        self._t.close()
        return out

    def stats(self) -> Dict[str, float]:
        """Counters: messages/bytes sent and received (data messages, headers included),
        replacements, skipped_pushes (:meth:`advance` calls), staleness (S_avg, S_max over received
        messages), pushes."""
        return {
            "pushes": self._pushes,
            "messages_sent": self.messages_sent,
            "bytes_sent": self.bytes_sent,
            "messages_received": self.messages_received,
            "bytes_received": self.bytes_received,
            "replacements": self.replacements,
            "skipped_pushes": self.skipped_pushes,
            "staleness_avg": self._stale_sum / self._stale_count if self._stale_count else 0.0,
            "staleness_max": self._stale_max,
            "close_messages": self._close_messages,
        }
