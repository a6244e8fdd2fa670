"""Non-blocking gossip for decentralized asynchronous SGD (push-sum or metropolis mixing).

Three separate pieces (numerics apart from the MPI glue):

* :class:`PushSum` — pure torch: a numerator ``x`` and a weight ``w``; ``split(out_degree)`` keeps
  ``1/(d+1)`` of the mass and returns the equal share each out-neighbour gets; ``absorb`` adds a
  received share; ``value()`` is the de-biased estimate ``x / w``. Correct on directed and
  time-varying graphs (column-stochastic mixing, :meth:`Topology.mixing_matrix` ``"uniform"``).
* :class:`MetropolisMixer` — pure torch: ``x_i <- W_ii x_i + sum_j W_ij x_j`` with the symmetric
  metropolis weights of an undirected topology (for synchronous / pairwise averaging).
* :class:`GossipEngine` — the MPI part: ``push`` snapshots a tensor and starts non-blocking sends
  to the current out-neighbours, ``poll`` returns whatever has arrived, ``close`` drains. No
  barrier or collective inside a step (the constructor duplicates the communicator once).

Typical DASGD loop with push-sum::

    eng = GossipEngine(topology, numel, dtype=torch.float32, max_in_flight=2)
    ps = PushSum(params_flat.clone())                 # weight 1.0 on every rank -> total mass n
    for step in range(steps):
        ...local SGD update of ps.x (the numerator)...
        share_x, share_w = ps.split(eng.out_degree(step))   # keeps its own share in ps
        eng.push(share_x, share_w, version=step, step=step) # returns at once; share_x may change now
        for m in eng.poll():                          # m.sender, m.version, m.weight, m.data
            ps.absorb(m.data, m.weight)
        params_flat.copy_(ps.value())
    for m in eng.close():                             # messages still in flight: merge them too
        ps.absorb(m.data, m.weight)
    eng.stats()   # messages/bytes sent+received, replacements, staleness_avg, staleness_max, ...

``push`` copies the tensor into a message buffer (the caller may change it at once). To skip that
copy, write the message into ``buf = eng.message_buffer()`` and ``eng.push(buf, ...)``; ``buf``
then belongs to the engine until it is sent.

After ``close()`` on all ranks (and absorbing what it returned) the push-sum mass is conserved:
sum of weights over ranks == n and sum of numerators == sum of the initial numerators (exactly up
to floating-point rounding of the additions).

Wire protocol (one tag on a private duplicate of ``comm``): every message is one byte buffer,
a 40-byte header ``[kind, sender, version, seq]`` (int64) + ``weight`` (float64), then ``numel``
elements of ``dtype``. Data messages go by synchronous-mode sends (a send completes only
when the receiver has matched it; persistent ``Ssend_init`` requests, one per message buffer and
peer, restarted for each message; receives are persistent ``Recv_init`` requests on
``receive_slots`` fixed buffers per in-neighbour, default 1), so "in flight" means "not yet received"
and the bound ``max_in_flight`` per out-neighbour is real back-pressure. A send beyond the
receiver's slots simply stays unmatched (only its header has arrived) until the receiver's next
``poll()`` re-posts the slot and takes it; the data never waits in a receive buffer of its own, so
one slot per in-neighbour costs one message of memory, not ``max_in_flight``. When a neighbour already has
``max_in_flight`` sends in flight, the new snapshot waits in one *pending* slot for that
neighbour; a newer push replaces the pending one (counted in ``replacements``). With
``merge="add"`` (the default, for push-sum) "replaces" means the pending message becomes the sum of
both (newest version in its header): push-sum messages are additive, so nothing is lost and mass
stays exact. With ``merge="replace"`` the older snapshot is dropped (for model averaging where
only the newest parameters matter; push-sum mass is then not conserved).

Termination: ``close()`` flushes the pending slots, then sends every possible out-neighbour (over
the whole period of a time-varying topology) a FIN carrying the number of data messages it sent
there, and keeps receiving until it has a FIN from every possible in-neighbour and all its own
sends have completed. MPI's non-overtaking rule (same source, tag, communicator) guarantees that a
FIN is matched after every data message sent before it, so when all FINs are in, everything has
been received; the counts are checked. Ranks may have run different numbers of steps. ``close()``
returns only when all in-neighbours are closing too (it must receive what they still send).
Progress: MPI moves a large (rendezvous) message only inside MPI calls of both ranks, so a rank
that computes for long between ``push``/``poll`` delays its transfers (never its neighbours'
steps). Calling ``poll()`` more often (it never waits) speeds delivery; merge what it returns.

Staleness of a received message = the receiver's current version (its last pushed ``version``)
minus the message's version, clamped at 0 for ``staleness_avg`` / ``staleness_max`` (the S_avg,
S_max of the DASGD bound).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from hpc_dgrab import runtime
from hpc_dgrab.comm.topology import Topology

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


class MetropolisMixer:
    """``x_i <- W_ii x_i + sum_j W_ij x_j`` with metropolis weights of an undirected topology."""

    def __init__(self, topology: Topology, rank: int) -> None:
        self.topology = topology
        self.rank = rank

    def weights(self, step: int = 0) -> Tuple[float, Dict[int, float]]:
        """(self weight, {neighbour: weight}) of this rank's row of the metropolis matrix."""
        row = self.topology.mixing_matrix("metropolis", step)[self.rank]
        nbrs = self.topology.in_neighbors(self.rank, step)
        return float(row[self.rank]), {j: float(row[j]) for j in nbrs}

    def mix(self, x: torch.Tensor, received: Mapping[int, torch.Tensor], step: int = 0) -> torch.Tensor:
        """The mixed tensor (new); ``received`` must hold every in-neighbour's value at ``step``."""
        own, others = self.weights(step)
        missing = set(others) - set(received)
        if missing:
            raise ValueError(f"metropolis mixing at step {step} lacks neighbours {sorted(missing)}")
        out = x * own
        for j, w in others.items():
            out.add_(received[j].to(out.dtype), alpha=w)
        return out


# =============================================================================== MPI engine
_NP = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class _Buffer:
    """One message buffer: header + data views onto a single byte array; ``refs`` = users;
    ``sends``: this buffer's persistent synchronous-send request per peer (created on first use)."""

    __slots__ = ("raw", "head", "weight_view", "data", "refs", "sends")

    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        np_dtype = np.dtype(_NP[dtype])
        self.raw = np.empty(HEADER_BYTES + numel * np_dtype.itemsize, dtype=np.uint8)
        self.head = self.raw[:32].view(np.int64)
        self.weight_view = self.raw[32:40].view(np.float64)
        self.data = torch.from_numpy(self.raw[HEADER_BYTES:].view(np_dtype))
        self.refs = 0
        self.sends: Dict[int, Any] = {}

    @property
    def weight(self) -> float:
        return float(self.weight_view[0])

    def free_requests(self) -> None:
        for req in self.sends.values():
            req.Free()
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

    Cost per message: receives are persistent requests (``Recv_init``, restarted per message) on
    ``receive_slots`` fixed buffers per in-neighbour; every message buffer keeps one persistent
    synchronous send (``Ssend_init``) per peer it goes to, so a step starts requests instead of
    building them. :meth:`message_buffer` lets the caller write the message straight into the buffer
    that is sent (no snapshot copy).
    """

    def __init__(self, topology: Topology, numel: int, dtype: torch.dtype = torch.float32,
                 comm: Optional[Any] = None, max_in_flight: int = 2, merge: str = "add",
                 receive_slots: int = 1) -> None:
        from mpi4py import MPI

        base = comm if comm is not None else runtime.world()
        if topology.n != base.size:
            raise ValueError(f"topology has {topology.n} ranks but the communicator has {base.size}")
        if dtype not in _NP:
            raise ValueError(f"gossip supports float16/32/64 tensors, not {dtype}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if receive_slots < 1:
            raise ValueError(f"receive_slots must be >= 1, got {receive_slots}")
        if merge not in ("add", "replace"):
            raise ValueError(f"merge must be 'add' or 'replace', got {merge!r}")
        self._MPI = MPI
        self.topology = topology
        self.numel = int(numel)
        self.dtype = dtype
        self.max_in_flight = int(max_in_flight)
        self.merge = merge
        self.comm = base.Dup()
        self.rank = self.comm.rank
        self.out_peers = topology.all_out_neighbors(self.rank)
        self.in_peers = topology.all_in_neighbors(self.rank)
        self.msg_bytes = HEADER_BYTES + self.numel * np.dtype(_NP[dtype]).itemsize
        self.version = 0
        self.closed = False
        self._pushes = 0
        self._free: List[_Buffer] = []
        self._free_limit = len(self.out_peers) * (self.max_in_flight + 1) + 2
        self._claimed: Optional[_Buffer] = None      # handed out by message_buffer(), not yet pushed
        self._peers_at: Dict[int, List[int]] = {}     # out-neighbours per phase of the period
        # sends (active requests only)
        self._sreqs: List[Any] = []
        self._smeta: List[Tuple[int, Optional[_Buffer]]] = []
        self._inflight: Dict[int, int] = {p: 0 for p in self.out_peers}
        self._pending: Dict[int, Optional[_Buffer]] = {p: None for p in self.out_peers}
        self._npending = 0
        self._sent: Dict[int, int] = {p: 0 for p in self.out_peers}
        # receives: receive_slots persistent receives per in-neighbour, one fixed list
        self._rreqs: List[Any] = []
        self._rslots: List[Tuple[int, _Buffer]] = []
        self._ractive: List[bool] = []
        self._held: List[int] = []
        self._received: Dict[int, int] = {p: 0 for p in self.in_peers}
        self._fin: Dict[int, int] = {}
        for p in self.in_peers:
            for _ in range(int(receive_slots)):
                buf = _Buffer(self.numel, dtype)
                req = self.comm.Recv_init([buf.raw, MPI.BYTE], source=p, tag=_TAG)
                req.Start()
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
        return self._free.pop() if self._free else _Buffer(self.numel, self.dtype)

    def _release(self, buf: _Buffer) -> None:
        buf.refs -= 1
        if buf.refs == 0:
            if len(self._free) < self._free_limit:
                self._free.append(buf)
            else:
                buf.free_requests()

    def _isend(self, peer: int, buf: _Buffer) -> None:
        req = buf.sends.get(peer)
        if req is None:
            req = buf.sends[peer] = self.comm.Ssend_init([buf.raw, self._MPI.BYTE], dest=peer, tag=_TAG)
        req.Start()
        self._sreqs.append(req)
        self._smeta.append((peer, buf))
        self._inflight[peer] += 1
        self._sent[peer] += 1
        self.messages_sent += 1
        self.bytes_sent += self.msg_bytes

    def _progress_sends(self) -> None:
        """Retire completed sends, then post pending snapshots where a slot became free."""
        if self._sreqs:
            done = self._MPI.Request.Testsome(self._sreqs)
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

    def _receive(self, hold: bool, deliver: Optional[Callable[[GossipMessage], Any]] = None) -> List[GossipMessage]:
        """Collect completed receives, sorted by (sender, send order). ``hold``: hand out views and
        keep their buffers until the next call; else ``deliver`` each view (then restart at once)
        or, without ``deliver``, copy the data and restart at once."""
        done = self._MPI.Request.Testsome(self._rreqs) if self._rreqs else None
        if not done:
            return []
        out: List[Tuple[int, int, GossipMessage]] = []
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
            self._rreqs[i].Start()
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
        """The engine-owned tensor (``numel`` elements) the next :meth:`push` sends from.

        Write the message into it (e.g. ``torch.mul(x, share, out=buf)``) and ``push(buf, ...)``: the
        push then skips its snapshot copy. Do not touch it after that push (it is being sent); until
        then repeated calls return the same tensor.
        """
        if self.closed:
            raise RuntimeError("gossip engine is closed")
        if self._claimed is None:
            self._claimed = self._buffer()
        return self._claimed.data

    def ready_peers(self, step: int = 0) -> List[int]:
        """The out-neighbours at ``step`` that take a message now: fewer than ``max_in_flight`` of
        this rank's sends to them in flight and none pending (completed sends are retired first).

        A push-sum caller may split its mass among these only (``1/(k+1)`` each) and push with
        ``peers=`` — a busy link then costs neither a message buffer nor a merge into the pending
        one, and the mass stays exact (the share for a busy link simply stays home). With none
        ready, :meth:`advance` moves the clock without sending.
        """
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
        if own:
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
        """Messages that arrived since the last call (sorted by sender, then send order); never waits.

        Each message's ``data`` is a view valid until the next ``poll()`` / ``close()``.
        """
        if self.closed:
            raise RuntimeError("gossip engine is closed")
        if self._held:
            self._repost_held()
        self._progress_sends()
        return self._receive(hold=True)

    def close(self, timeout: Optional[float] = None,
              deliver: Optional[Callable[[GossipMessage], Any]] = None) -> List[GossipMessage]:
        """Drain: flush pending sends, exchange FINs, receive everything still in flight.

        Returns the data messages received while draining (copies) — merge them like ``poll()``'s.
        With ``deliver``, each message is instead handed to ``deliver(msg)`` as it arrives, its
        ``data`` a view valid only during that call (merge it there: no copies, no message memory),
        and the returned list is empty.
        Blocks until every in-neighbour has closed too. ``timeout`` (seconds) raises RuntimeError
        instead of waiting forever (for tests); None waits.
        """
        MPI = self._MPI
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
                    self._sreqs.append(self.comm.Issend([fin, MPI.BYTE], dest=peer, tag=_TAG))
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
            req.Cancel()
        if active:
            MPI.Request.Waitall(active)
        for req in self._rreqs:
            req.Free()
        self._rreqs, self._rslots, self._ractive = [], [], []
        for buf in self._free + ([self._claimed] if self._claimed is not None else []):
            buf.free_requests()
        self._free, self._claimed = [], None
        bad = {s: (self._received[s], self._fin[s]) for s in self.in_peers
               if self._received[s] != self._fin[s]}
        if bad:
            raise RuntimeError(f"gossip close on rank {self.rank}: received/sent counts differ {bad}")
        self._close_messages = drained
        self.closed = True
        self.comm.Free()
        return out

    def stats(self) -> Dict[str, float]:
        """Counters: messages/bytes sent and received (data messages, headers included),
        replacements, skipped_pushes (:meth:`advance` calls), staleness (S_avg, S_max over received messages), pushes."""
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
