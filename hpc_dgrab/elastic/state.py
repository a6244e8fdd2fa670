"""Elastic states: :class:`State` (user attributes), :class:`ObjectState`, :class:`TorchState`
(model, optimizer, handlers), and the :func:`run` decorator. Contract: :mod:`hpc_dgrab.elastic`."""
from __future__ import annotations

import copy
import functools
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from hpc_dgrab import api
from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["ENV_DIR", "ObjectState", "State", "TorchState", "run"]

#: the environment variable naming the commit directory when ``checkpoint_dir`` is not given
ENV_DIR = "HPC_DGRAB_ELASTIC_DIR"
#: commits kept on disk
KEEP = 2


def _is_handler(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


class State:
    """User attributes (keyword arguments) committed, restored and synchronised together.

    ``checkpoint_dir``: where rank 0 writes each commit (default: ``$HPC_DGRAB_ELASTIC_DIR``;
    neither: memory only)."""

    def __init__(self, checkpoint_dir: Optional[str] = None, **kwargs: Any) -> None:
        self._dir = checkpoint_dir or os.environ.get(ENV_DIR) or None
        self._names: List[str] = list(kwargs)
        self._callbacks: List[Callable[[], None]] = []
        self._saved: Optional[Dict[str, Any]] = None
        self.commits = 0
        for k, v in kwargs.items():
            setattr(self, k, v)

    # ------------------------------------------------------------------ what is saved
    def _objects(self) -> Dict[str, Any]:
        """name -> object with state_dict()/load_state_dict() (model, optimizer, sampler...)."""
        return {k: getattr(self, k) for k in self._names if _is_handler(getattr(self, k))}

    def _capture(self, skip: Tuple[str, ...] = ()) -> Dict[str, Any]:
        objects = self._objects()
        return {"objects": {k: copy.deepcopy(v.state_dict()) for k, v in objects.items() if k not in skip},
                "attrs": {k: copy.deepcopy(getattr(self, k)) for k in self._names if k not in objects}}

    def _apply(self, snap: Dict[str, Any]) -> None:
        for k, sd in snap["objects"].items():
            getattr(self, k).load_state_dict(copy.deepcopy(sd))
        for k, v in snap["attrs"].items():
            setattr(self, k, copy.deepcopy(v))

    # ------------------------------------------------------------------ Horovod's API
    def register_reset_callbacks(self, callbacks: List[Callable[[], None]]) -> None:
        """Kept for Horovod scripts; never called here (membership does not change in a job)."""
        self._callbacks.extend(callbacks)

    def on_reset(self) -> None:
        for cb in self._callbacks:
            cb()

    def check_host_updates(self) -> None:
        """Horovod raises when hosts changed; here they never do during a job."""

    def commit(self) -> None:
        """Snapshot the state in memory (and on disk from rank 0 when a directory is set)."""
        self.save()
        self.check_host_updates()

    def save(self) -> None:
        """The snapshot part of :meth:`commit`."""
        self._saved = self._capture()
        self.commits += 1
        if self._dir is not None and api.rank() == 0:
            self._write(self._saved)

    def restore(self) -> None:
        """Put the last snapshot (commit or sync) back."""
        if self._saved is None:
            raise UserError("elastic state: restore() before any commit()")
        self._apply(self._saved)

    def sync(self) -> None:
        """Collective: every rank takes rank 0's state; then it is the in-memory snapshot."""
        objects = self._objects()
        for v in objects.values():
            merge = getattr(v, "merge_ranks", None)
            if callable(merge):
                merge()
        done = self._sync_objects(objects)
        snap = self._capture(skip=done)
        snap = api.broadcast_object(snap if api.rank() == 0 else None, root_rank=0)
        self._apply(snap)
        self._saved = self._capture()

    def _sync_objects(self, objects: Dict[str, Any]) -> Tuple[str, ...]:
        """Broadcast large objects' tensors on their own (TorchState); the names done."""
        return ()

    # ------------------------------------------------------------------ disk
    def _write(self, snap: Dict[str, Any]) -> None:
        from mpi4py import MPI

        from hpc_dgrab import checkpoint

        try:
            checkpoint.encode(snap)
        except TypeError as exc:
            raise UserError(f"elastic state cannot be written to {self._dir}: {exc}") from None
        os.makedirs(self._dir or ".", exist_ok=True)
        checkpoint.save(self._dir or ".", checkpoint.Position(0, self.commits), snap, MPI.COMM_SELF,
                        keep=KEEP, meta={"elastic_commit": self.commits})

    def load_from_disk(self) -> bool:
        """Collective: rank 0 loads the newest commit in the directory (if any); True everywhere
        if one was found (then :meth:`sync` hands it to the other ranks)."""
        found = None
        if self._dir is not None and api.rank() == 0:
            from mpi4py import MPI

            from hpc_dgrab import checkpoint

            loaded = checkpoint.load_latest(self._dir, MPI.COMM_SELF) if os.path.isdir(self._dir) else None
            if loaded is not None:
                self._apply(loaded.state)
                self.commits = int(loaded.position.step)
                found = self.commits
                log.info("elastic: resumed from commit %d in %s", found, self._dir)
        found = api.broadcast_object(found, root_rank=0)
        if found is not None:
            self.commits = int(found)
        return found is not None


class ObjectState(State):
    """Horovod's ObjectState: user attributes only (``bcast_object``/``get_rank`` are ignored)."""

    def __init__(self, bcast_object: Any = None, get_rank: Any = None, checkpoint_dir: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(checkpoint_dir=checkpoint_dir, **kwargs)


class TorchState(State):
    """Horovod's TorchState: ``model``, ``optimizer`` and user attributes; any attribute with
    ``state_dict``/``load_state_dict`` (an ``ElasticSampler``, an LR scheduler) is saved by it."""

    def __init__(self, model: Any = None, optimizer: Any = None, checkpoint_dir: Optional[str] = None,
                 **kwargs: Any) -> None:
        extra = {k: v for k, v in (("model", model), ("optimizer", optimizer)) if v is not None}
        super().__init__(checkpoint_dir=checkpoint_dir, **extra, **kwargs)

    def _sync_objects(self, objects: Dict[str, Any]) -> Tuple[str, ...]:
        model, optimizer = objects.get("model"), objects.get("optimizer")
        if model is not None:
            api.broadcast_parameters(model.state_dict(), root_rank=0)
        if optimizer is not None:
            api.broadcast_optimizer_state(optimizer, root_rank=0)
        return tuple(k for k in ("model", "optimizer") if k in objects)


def run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for ``train(state, ...)``: resume from the newest commit on disk (if a directory
    is set and holds one), synchronise the state from rank 0, then call ``train``."""
    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(state, State):
            raise UserError(f"hd.elastic.run: the first argument must be an elastic state, "
                            f"got {type(state).__name__}")
        state.load_from_disk()
        state.sync()
        return func(state, *args, **kwargs)
    return wrapper
