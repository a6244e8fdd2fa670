"""Error feedback (the Memory role): what a worker did not send is added to its next gradient.

``compensate_(grad)`` turns the memory into ``a = grad + e`` and returns it; ``update(a, indices)``
keeps ``e = a - v``, where ``v`` is ``a`` on the sent ``indices`` and 0 elsewhere, so that
``a == v + e`` exactly. A gradient may be one tensor or a sequence of tensors that are consecutive
pieces of the flat vector (e.g. each parameter's own ``.grad``); they are never concatenated.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence, Union

import torch

log = logging.getLogger(__name__)

#: a flat vector given whole or as consecutive pieces (each viewed 1-D)
Pieces = Union[torch.Tensor, Sequence[torch.Tensor]]


def pieces_of(grad: Pieces) -> List[torch.Tensor]:
    """``grad`` as a list of 1-D views (one element for a single tensor)."""
    if isinstance(grad, torch.Tensor):
        return [grad.detach().reshape(-1)]
    return [t.detach().reshape(-1) for t in grad]


class ErrorFeedback:
    """Error-feedback memory ``e`` of one worker (a flat vector of ``numel`` entries)."""

    def __init__(self, numel: int, dtype: torch.dtype = torch.float32, device: Any = "cpu") -> None:
        self.error = torch.zeros(int(numel), dtype=dtype, device=device)

    def _check(self, parts: List[torch.Tensor]) -> None:
        numel = sum(t.numel() for t in parts)
        if numel != self.error.numel():
            raise ValueError(f"gradient has {numel} entries, memory {self.error.numel()}")
        if self.error.dtype != parts[0].dtype or self.error.device != parts[0].device:
            self.error = self.error.to(dtype=parts[0].dtype, device=parts[0].device)

    def compensate(self, grad: Pieces) -> torch.Tensor:
        """The error-compensated gradient ``grad + e`` (a new flat tensor)."""
        parts = pieces_of(grad)
        self._check(parts)
        return (parts[0] if len(parts) == 1 else torch.cat(parts)) + self.error

    def compensate_(self, grad: Pieces) -> torch.Tensor:
        """:meth:`compensate` in place: the memory becomes ``grad + e`` and is returned (no
        allocation); :meth:`update` must follow before the memory is read again."""
        parts = pieces_of(grad)
        self._check(parts)
        off = 0
        for t in parts:
            self.error[off:off + t.numel()].add_(t)
            off += t.numel()
        return self.error

    def update(self, compensated: torch.Tensor, indices: torch.Tensor) -> None:
        """Remember everything of ``compensated`` except the sent ``indices``.

        Takes ownership of ``compensated`` (zeroes the sent entries in place, no copy); the values
        sent must have been gathered from it before.
        """
        self.error = compensated.detach().index_fill_(0, indices, 0)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The memory ``e`` (a copy)."""
        return {"error": self.error.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore ``e`` from :meth:`state_dict`."""
        error = torch.as_tensor(state["error"])
        if error.numel() != self.error.numel():
            raise ValueError(f"memory state has {error.numel()} entries, expected {self.error.numel()}")
        self.error = error.clone().to(device=self.error.device)
