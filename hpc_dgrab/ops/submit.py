"""The one path from a user's call to the engine: tensors to CPU, a request, a handle.

Every operation module calls :func:`submit`; results come back on the input's device.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch

from hpc_dgrab.ops import engine
from hpc_dgrab.ops.engine import Handle


def cpu(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Detached contiguous CPU views (copies only when needed) of ``tensors``."""
    return [t.detach().to("cpu").contiguous() for t in tensors]


def submit(kind: str, tensors: Sequence[torch.Tensor], name: Optional[str], process_set: Any,
           finish: Optional[Callable[[Any], Any]] = None, **fields: Any) -> Handle:
    """Queue one operation on the engine and return its handle (``finish`` maps its results)."""
    eng = engine.current(f"hpc_dgrab.{kind}()")
    return eng.submit(kind, name, process_set, cpu(tensors), finish, **fields)


def to_device(results: List[torch.Tensor], like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``results[i]`` on ``like[i]``'s device."""
    return [r.to(t.device) if r.device != t.device else r for r, t in zip(results, like)]


def synchronize(handle: Handle) -> Any:
    """Wait for an asynchronous operation and return its result (raises its error, if any)."""
    return handle.wait()


def poll(handle: Handle) -> bool:
    """True once an asynchronous operation has finished (never blocks)."""
    return handle.poll()
