"""Matching operations across ranks by name: the coordinator's table, as pure logic (no MPI).

Every rank's engine sends its :class:`Request` s (one per submitted operation) and its waiting
notices to the coordinator (rank 0), which keeps a table ``(process set, name) -> requests``:

* An operation is **ready** when every member of its process set has submitted it (ranks that
  called ``join`` count as present; they contribute zeros to reductions). Ready operations leave
  the table as :class:`Response` s, in the order they became ready; every member executes the
  responses in that order, so ranks may submit named operations in different orders.
* A ready operation whose requests disagree (kind, dtypes, shapes, op, root, scale factors, number
  of tensors) becomes an error response with one message, the same for every member.
* **Stall**: when every rank is stuck (waiting on an operation still in the table, in ``join``, or
  shut down) nothing can ever become ready (names differ across ranks, or an operation on a set some
  members never submit): every pending operation becomes an error response naming what each rank
  waits on.
* ``join`` completes when every rank has joined; its response carries the last rank to join.
  ``shutdown`` completes when every rank asked for it and nothing is pending.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from hpc_dgrab.ops.reduce_ops import NAMES

Shape = Tuple[int, ...]
Key = Tuple[int, str]   # (process set id, name)

JOIN = "join"
BARRIER = "barrier"
REDUCTIONS = ("allreduce", "reducescatter")


@dataclass(frozen=True)
class Request:
    """One rank's submission of one operation (possibly a group of tensors)."""

    rank: int
    seq: int                      # this rank's submission counter (identifies the instance)
    name: str
    kind: str                     # allreduce, allgather, broadcast, alltoall, reducescatter, barrier, join
    process_set: int
    members: Tuple[int, ...]      # global ranks of the process set
    dtypes: Tuple[str, ...] = ()
    shapes: Tuple[Shape, ...] = ()
    op: int = 0
    root: int = -1
    prescale: float = 1.0
    postscale: float = 1.0
    splits: Tuple[Tuple[int, ...], ...] = ()   # alltoall: rows sent to each member, per tensor

    @property
    def key(self) -> Key:
        return (self.process_set, self.name)


@dataclass(frozen=True)
class Response:
    """What every member executes for one ready operation (or the error they all raise)."""

    key: Key
    kind: str
    error: Optional[str] = None
    requests: Dict[int, Request] = field(default_factory=dict)   # by global rank (submitters)
    joined: Tuple[int, ...] = ()                                # ranks in join that fill in zeros
    last_joined: int = -1                                       # join: the last rank to join
    targets: Tuple[int, ...] = ()                               # ranks that receive it


def _fmt_shape(s: Shape) -> str:
    return "(" + ", ".join(map(str, s)) + ("," if len(s) == 1 else "") + ")"


def mismatch(reqs: Sequence[Request]) -> Optional[str]:
    """The one-line message for requests of one name that disagree, or None when they agree."""
    first = reqs[0]
    what = f"{first.kind} {first.name!r}"

    def differ(label: str, get: Callable[[Request], object],
               fmt: Callable[[Any], str] = str) -> Optional[str]:
        for r in reqs[1:]:
            if get(r) != get(first):
                return (f"mismatched {label} in {what}: rank {first.rank} has {fmt(get(first))}, "
                        f"rank {r.rank} has {fmt(get(r))}")
        return None

    checks = [differ("operation", lambda r: r.kind),
              differ("number of tensors", lambda r: len(r.shapes)),
              differ("dtype", lambda r: r.dtypes, lambda d: ", ".join(d))]
    kind = first.kind
    if kind in REDUCTIONS or kind == "broadcast":
        checks.append(differ("shape", lambda r: r.shapes, lambda s: ", ".join(map(_fmt_shape, s))))
    if kind in ("allgather", "alltoall"):
        checks.append(differ("number of dimensions", lambda r: tuple(len(s) for s in r.shapes)))
        checks.append(differ("shape after the first dimension", lambda r: tuple(s[1:] for s in r.shapes),
                             lambda s: ", ".join(map(_fmt_shape, s))))
    if kind in REDUCTIONS:
        checks.append(differ("reduction op", lambda r: r.op, lambda o: NAMES.get(o, str(o))))
        checks.append(differ("prescale/postscale factors", lambda r: (r.prescale, r.postscale)))
    if kind == "broadcast":
        checks.append(differ("root rank", lambda r: r.root))
    for c in checks:
        if c is not None:
            return "hpc_dgrab: " + c
    return None


def joined_error(reqs: Sequence[Request], joined: Sequence[int]) -> Optional[str]:
    """An error when ``reqs`` is an operation that ranks in ``join`` cannot take part in."""
    kind = reqs[0].kind
    if not joined or kind in REDUCTIONS or kind == BARRIER:
        return None
    return (f"hpc_dgrab: {kind} {reqs[0].name!r} cannot run while rank(s) {sorted(joined)} have called "
            f"join() (join supports allreduce and reducescatter)")


class Table:
    """The coordinator's state: pending requests, joined ranks, waits, shutdown requests."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pending: Dict[Key, Dict[int, Request]] = {}
        self.order: List[Key] = []               # keys in first-submission order
        self.joined: List[int] = []
        self.waiting: Dict[int, Tuple[int, int]] = {}   # rank -> (seq it waits on, 0)
        self.shutdown: set = set()

    # ---------------------------------------------------------------- input
    def submit(self, req: Request) -> None:
        if req.kind == JOIN:
            if req.rank not in self.joined:
                self.joined.append(req.rank)
            return
        entry = self.pending.setdefault(req.key, {})
        if not entry:
            self.order.append(req.key)
        entry[req.rank] = req

    def wait(self, rank: int, seq: Optional[int]) -> None:
        if seq is None:
            self.waiting.pop(rank, None)
        else:
            self.waiting[rank] = (seq, 0)

    def request_shutdown(self, rank: int) -> None:
        self.shutdown.add(rank)

    # ---------------------------------------------------------------- output
    def _stuck(self, rank: int) -> bool:
        if rank in self.shutdown or rank in self.joined:
            return True
        w = self.waiting.get(rank)
        if w is None:
            return False
        return any(e.get(rank) is not None and e[rank].seq == w[0] for e in self.pending.values())

    def step(self) -> List[Response]:
        """Responses for everything that is ready now, in order."""
        out: List[Response] = []
        joined = tuple(self.joined)
        for key in list(self.order):
            entry = self.pending[key]
            first = next(iter(entry.values()))
            missing = [m for m in first.members if m not in entry and m not in joined]
            if missing:
                continue
            reqs = [entry[r] for r in sorted(entry)]
            error = mismatch(reqs) or joined_error(reqs, [j for j in joined if j in first.members])
            fill = tuple(j for j in joined if j in first.members and j not in entry)
            out.append(Response(key=key, kind=first.kind, error=error, requests=dict(entry),
                                joined=() if error else fill, targets=first.members))
            del self.pending[key]
            self.order.remove(key)
        if len(self.joined) == self.size:
            out.append(Response(key=(0, JOIN), kind=JOIN, last_joined=self.joined[-1],
                                targets=tuple(range(self.size))))
            self.joined = []
        if not out and self.pending and all(self._stuck(r) for r in range(self.size)):
            out.extend(self._stall())
        if not out and not self.pending and len(self.shutdown) == self.size:
            out.append(Response(key=(0, "shutdown"), kind="shutdown", targets=tuple(range(self.size))))
        return out

    def _stall(self) -> List[Response]:
        waits = []
        for r in range(self.size):
            what = "shut down" if r in self.shutdown else "join()" if r in self.joined else None
            if what is None:
                seq = self.waiting[r][0]
                what = next(repr(k[1]) for k, e in self.pending.items() if r in e and e[r].seq == seq)
            waits.append(f"rank {r} waits on {what}")
        message = ("hpc_dgrab: the ranks wait on operations the others never submitted (a name or process "
                   "set mismatch): " + ", ".join(waits))
        out = [Response(key=key, kind=self.pending[key][next(iter(self.pending[key]))].kind, error=message,
                        requests=dict(self.pending[key]), targets=tuple(sorted(self.pending[key])))
               for key in self.order]
        self.pending.clear()
        self.order.clear()
        return out
