"""The one transport interface: how bytes move between ranks.

Everything above ``comm`` (the gradient exchange, ``DistributedOptimizer``, GradAlign, gossip, the
public API) moves tensors through an object of this shape, so a new way of moving them (MPI,
Horovod, ``torch.distributed``) is one new file that implements it.

Contract, for every implementation:

* **Collective calls** (``allreduce*``, ``allgather*``, ``broadcast_``) are called by every rank of
  the transport's group, in the same order, with the same dtype; ``allreduce*`` and ``allgather``
  with the same shape, ``allgatherv`` with the same shape after the first dimension.
* ``allreduce_async_(t)`` sums ``t`` over ranks **in place** and returns a :class:`Handle` at once;
  ``handle.wait()`` returns ``t`` holding the sum. Handles finish in the order they were started.
  ``average=True`` divides by :attr:`size` after the sum (floating dtypes only).
* Tensors may be on any device the implementation supports; results come back on the input's device.
* **Point-to-point** (what gossip uses): persistent ``send_init``/``recv_init`` requests on raw
  byte buffers (numpy ``uint8`` arrays), started with ``start(request)``, completed by
  ``testsome``/``waitall``. Requests are opaque objects of the transport that made them.
  Synchronous-mode sends: a send completes only once the receiver has matched it.
* ``bytes_sent`` counts the payload bytes this rank handed to the transport (cumulative).
* ``close()`` ends what the transport started (threads, duplicated communicators); it is idempotent.
  A closed transport refuses further calls. Implementations :func:`register` themselves;
  :func:`close_all` closes every live one (``hpc_dgrab.shutdown()``).
"""
from __future__ import annotations

import itertools
import logging
import weakref
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
import torch

log = logging.getLogger(__name__)


@runtime_checkable
class Handle(Protocol):
    """A started asynchronous collective."""

    def test(self) -> bool:
        """True once the operation has completed (``wait()`` then returns at once); never blocks."""
        ...

    def wait(self) -> torch.Tensor:
        """Finish the operation and return its result tensor."""
        ...


class Request(Protocol):
    """An opaque point-to-point request of one transport: only that transport's ``start``,
    ``testsome``, ``waitall``, ``cancel`` and ``free`` handle it (no wrapper on gossip's hot path)."""


@runtime_checkable
class Collectives(Protocol):
    """Collective operations over one group of ranks."""

    rank: int
    size: int

    def allreduce_async_(self, tensor: torch.Tensor, average: bool = False) -> Handle:
        """Start an in-place sum (mean with ``average``) of ``tensor`` over ranks."""
        ...

    def allreduce_(self, tensor: torch.Tensor, average: bool = False) -> torch.Tensor:
        """Blocking in-place sum (mean with ``average``); returns ``tensor``."""
        ...

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's equal-shape ``tensor``, concatenated along dimension 0 in rank order."""
        ...

    def allgatherv(self, tensor: torch.Tensor,
                   counts: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, List[int]]:
        """Every rank's ``tensor`` (first dimensions may differ), concatenated along dimension 0 in
        rank order, and each rank's first dimension. ``counts``: those first dimensions when every
        rank knows them already (skips their exchange)."""
        ...

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` with ``root``'s, in place; returns ``tensor``."""
        ...

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this rank handed to the transport (cumulative)."""
        ...

    def close(self) -> None:
        """End what the transport started; idempotent."""
        ...


@runtime_checkable
class PointToPoint(Protocol):
    """The non-blocking point-to-point operations of gossip, on raw byte buffers."""

    rank: int
    size: int

    def send_init(self, buf: np.ndarray, dest: int, tag: int) -> Request:
        """A persistent synchronous-mode send of ``buf`` (``uint8``) to ``dest``."""
        ...

    def recv_init(self, buf: np.ndarray, source: int, tag: int) -> Request:
        """A persistent receive into ``buf`` (``uint8``) from ``source``."""
        ...

    def issend(self, buf: np.ndarray, dest: int, tag: int) -> Request:
        """A one-shot synchronous-mode send, already started."""
        ...

    def start(self, request: Request) -> None:
        """(Re)start a persistent request."""
        ...

    def testsome(self, requests: Sequence[Request]) -> Optional[List[int]]:
        """Indices of the completed requests among ``requests`` (None when none is active)."""
        ...

    def waitall(self, requests: Sequence[Request]) -> Any:
        """Block until every request has completed."""
        ...

    def cancel(self, request: Request) -> None:
        """Cancel a pending receive (complete it with :meth:`waitall`)."""
        ...

    def free(self, request: Request) -> None:
        """Release a request that is not active."""
        ...


@runtime_checkable
class Transport(Collectives, PointToPoint, Protocol):
    """Collectives and point-to-point over one group: what the MPI transport provides in full.
    A transport that has no point-to-point (Horovod, ``torch.distributed`` for gossip) implements
    :class:`Collectives` only, and gossip keeps running over MPI."""


class Done:
    """The :class:`Handle` of an operation that has already finished (``wait()`` returns its tensor)."""

    __slots__ = ("_tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def test(self) -> bool:
        return True

    def wait(self) -> torch.Tensor:
        return self._tensor


_LIVE: Dict[int, weakref.ref[Any]] = {}
_SEQ = itertools.count()


def register(transport: Collectives) -> None:
    """Record a live transport, so that :func:`close_all` reaches it (it is held weakly)."""
    key = next(_SEQ)
    _LIVE[key] = weakref.ref(transport, lambda _: _LIVE.pop(key, None))


def close_all() -> int:
    """Close every live transport, in the order they were made (the same on every rank); the
    number closed."""
    closed = 0
    for key in sorted(_LIVE):
        ref = _LIVE.pop(key, None)
        t = ref() if ref is not None else None
        if t is not None:
            t.close()
            closed += 1
    return closed
