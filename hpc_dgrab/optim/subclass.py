"""The optimizer wrappers' one trick: an object of a subclass of the user's optimizer class that
shares the original's param groups and state (``isinstance``, LR schedulers, ``state_dict`` work)."""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["subclass_instance"]


def subclass_instance(optimizer: torch.optim.Optimizer, mixin: type) -> Any:
    """An object of a new subclass ``(mixin, type(optimizer))`` sharing ``optimizer``'s param groups,
    state, hooks and defaults; not methods bound to the original object (an LR scheduler wraps
    ``optimizer.step`` on the instance: that one would bypass the mixin's ``step``)."""
    base = type(optimizer)
    cls = type(base.__name__, (mixin, base), {"__module__": base.__module__})
    # mypy types the dynamically created class as a plain `type` and resolves __new__ on the
    # metaclass; at run time this is the class's own (inherited) __new__
    obj = cls.__new__(cls)  # type: ignore[call-overload]
    obj.__dict__.update({k: v for k, v in optimizer.__dict__.items()
                         if not (callable(v) and hasattr(base, k))})
    return obj
