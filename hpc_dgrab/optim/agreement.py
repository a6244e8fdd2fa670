"""What ``DistributedOptimizer``'s ranks must agree on, checked collectively (never a hang).

* :func:`check_settings` (construction): backend, compression, ``backward_passes_per_step`` and the
  bucket plan; one small all-gather, next to the parameter-list check.
* :func:`check_layout` (``synchronize()``): the payload sizes; one small all-gather at the first
  step, and after a step whose flags say that some rank's sizes changed.
* The step's flags (:data:`N_FLAGS` numbers summed in the last message, no extra round trip): how
  many ranks ran more backward passes than ``backward_passes_per_step``, did a backward between
  ``synchronize()`` and ``step()`` (:func:`passes_error`), or changed their payload sizes (that
  rank's message keeps the agreed sizes, zero-filled, so that it matches every other rank's).

Every mismatch is the same one-line collective :class:`~hpc_dgrab.errors.UserError` on every rank,
naming the setting and two ranks' values.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from hpc_dgrab.errors import UserError

#: the step's flags: [ranks with extra backward passes, ranks with a backward between
#: synchronize() and step() in the previous step, ranks whose payload sizes changed]
N_FLAGS = 3


def _first_difference(gathered: List[Dict[str, Any]]) -> Optional[str]:
    """``"KEY (rank 0 has A, rank R has B)"`` for the first key where a rank differs from rank 0."""
    for r, other in enumerate(gathered):
        for key, value in gathered[0].items():
            if other.get(key) != value:
                return f"{key} (rank 0 has {value}, rank {r} has {other.get(key)})"
    return None


def _gather(mine: Dict[str, Any], transport: Any) -> List[Dict[str, Any]]:
    from hpc_dgrab.comm.objects import allgather_object

    return allgather_object(mine, transport)


def check_settings(backend: str, compression: Any, passes: int, groups: Sequence[Sequence[torch.Tensor]],
                   comm: Any) -> None:
    """Collective: the same UserError on every rank unless every rank passes the same settings."""
    from hpc_dgrab.comm.collectives import default_transport

    plan = [len(g) for g in groups]
    mine = {"backend": repr(backend), "compression": repr(compression),
            "backward_passes_per_step": passes,
            "the bucket plan (parameters per bucket; bucket_cap_mb)": plan}
    diff = _first_difference(_gather(mine, default_transport(comm)))
    if diff is not None:
        raise UserError(f"DistributedOptimizer: {diff} differs across ranks; every rank must pass "
                        "the same settings", collective=True)


def check_layout(sizes: Tuple[int, ...], transport: Any) -> Tuple[int, ...]:
    """Collective over the optimizer's own ``transport`` (after what it has in flight): ``sizes``,
    or the same UserError on every rank unless every rank has these payload sizes."""
    diff = _first_difference(_gather({"payload sizes": list(sizes)}, transport))
    if diff is not None:
        raise UserError(f"DistributedOptimizer.add_payload: {diff} differ across ranks; every rank "
                        "must add payloads of the same sizes in the same order in a step", collective=True)
    return sizes


def new_layout(sizes: Tuple[int, ...], payloads: List[torch.Tensor], like: torch.Tensor,
               exchange: Any) -> Tuple[Optional[str], Optional[torch.Tensor]]:
    """Collective, after a step whose flags say some rank's payload sizes changed: (the one line, None)
    if the ranks' ``sizes`` differ, else (None, the payloads' sum over ranks in ``like``'s dtype)."""
    try:
        check_layout(sizes, exchange.transport)
    except UserError as exc:
        return str(exc), None
    return None, exchange.sum_(torch.cat([t.to(like.dtype) for t in payloads] + [like.new_zeros(0)]))


def flags(extra: bool, late: bool, changed: bool) -> torch.Tensor:
    """This rank's step flags (summed over ranks in the last message)."""
    return torch.tensor([float(extra), float(late), float(changed)], dtype=torch.float64)


def passes_error(summed: Sequence[float], passes: int, size: int) -> Optional[str]:
    """The one line for the summed step flags, or None when every rank kept to ``passes``."""
    extra, late = int(round(summed[0])), int(round(summed[1]))
    if extra:
        return (f"DistributedOptimizer: more than backward_passes_per_step={passes} backward passes "
                f"before step() on {extra} of {size} rank(s); set backward_passes_per_step to the "
                "number of backward() calls per step() (the same on every rank)")
    if late:
        return (f"DistributedOptimizer: backward() between synchronize() and step() on {late} of "
                f"{size} rank(s) in the previous step; call step() (or zero_grad()) before the next "
                "backward()")
    return None
