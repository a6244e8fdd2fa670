"""``join`` and ``barrier`` (Horovod's names), through the same engine as the operations.

* ``barrier(process_set=None)``: returns once every member of the set has reached it (the
  negotiation itself is the barrier; no data moves).
* ``join()``: this rank has no more data. Until every rank has joined, its engine takes part in
  the other ranks' all-reduces and reduce-scatters with zeros (so an ``Average`` divides by the
  full size); an allgather, broadcast or alltoall meanwhile raises ``OpMismatchError`` on the
  ranks that submitted it. Returns the last rank to join, the same on every rank. Every rank's
  count of unnamed operations restarts there (ranks that joined early submitted fewer).
"""
from __future__ import annotations

from typing import Any, Optional

from hpc_dgrab.ops.submit import submit, synchronize


def barrier(process_set: Any = None) -> None:
    """Collective over the set: wait until every member has called it."""
    synchronize(submit("barrier", [], None, process_set))


def join(device: Optional[int] = None) -> int:
    """Collective over every rank: wait until every rank has joined; the last rank to join."""
    del device   # Horovod's GPU argument; every tensor here moves through the CPU
    return int(synchronize(submit("join", [], None, None)))
