"""``none``: no compression — every entry is sent; the exchanger uses a dense all-reduce."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from hpc_dgrab.compress.base import Compressor, State


class NoneCompressor(Compressor):
    """The identity: all indices, all values (the exchanger sends it as one dense all-reduce)."""

    name = "none"
    dense = True

    def __init__(self) -> None:
        super().__init__(density=1.0)

    def compress(self, tensor: torch.Tensor, state: State,
                 workspace: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        flat = tensor.reshape(-1)
        return torch.arange(flat.numel(), device=flat.device), flat.clone(), None
