"""What a checkpoint of a training job holds, and resuming from it.

One file per rank (:mod:`hpc_dgrab.checkpoint`), a dictionary with the keys ``own`` (this rank's
``[epoch, step]``), ``model``, ``optimizer`` (string keys only), ``sorter``, ``driver``, ``rng``
(torch, numpy and Python generators), ``progress`` (the running epoch's partial numbers) and
``history`` (per-rank epoch records a driver keeps until the end). The meta holds the settings a
resume must match (:meth:`TrainConfig.resume_settings`). This layout is the checkpoint format: files
written by earlier versions resume.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from hpc_dgrab import checkpoint
from hpc_dgrab.errors import UserError, agree
from hpc_dgrab.training.config import RESUME_DEFAULTS, TrainConfig

if TYPE_CHECKING:
    from mpi4py import MPI

    from hpc_dgrab.optim.sampler import OrderedSampler
    from hpc_dgrab.training.drivers.base import Driver

log = logging.getLogger(__name__)

Record = Dict[str, Any]


@dataclasses.dataclass
class Cursor:
    """A rank's place in the run: ``step`` steps of epoch ``epoch`` (0-based) are done."""

    epoch: int = 0
    step: int = 0

    def key(self) -> int:
        """One integer ordered like the place (for a MIN over ranks)."""
        return self.epoch * 2 ** 32 + self.step

    @classmethod
    def of_key(cls, key: int) -> Cursor:
        return cls(key // 2 ** 32, key % 2 ** 32)


@dataclasses.dataclass
class EpochProgress:
    """The running epoch's partial numbers (kept in a mid-epoch checkpoint)."""

    loss_sum: float = 0.0
    elapsed_s: float = 0.0
    counters0: Dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Start:
    """Where a run starts: its cursor, the running epoch's progress, a driver's kept history."""

    cursor: Cursor = dataclasses.field(default_factory=Cursor)
    progress: EpochProgress = dataclasses.field(default_factory=EpochProgress)
    history: List[Record] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Parts:
    """The objects whose state a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: OrderedSampler
    driver: Driver


def rng_state() -> Dict[str, Any]:
    """The torch, numpy and Python generators' states, as plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [kind, keys, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))


def optimizer_state(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The optimizer's state with string keys only (parameter index -> its buffers)."""
    sd = dict(optimizer.state_dict())
    return {**sd, "state": [[int(i), dict(s)] for i, s in sorted(sd["state"].items())]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    groups = [dict(g) for g in state["param_groups"]]
    for g in groups:
        g["params"] = [int(p) for p in g["params"]]
    optimizer.load_state_dict({**state, "state": {int(i): s for i, s in state["state"]},
                               "param_groups": groups})


def save(cfg: TrainConfig, comm: MPI.Comm, own: Cursor, progress: EpochProgress, history: List[Record],
         parts: Parts) -> None:
    """Collective: write every rank's state at its place ``own`` (named after the lowest place)."""
    from mpi4py import MPI

    lowest = Cursor.of_key(comm.allreduce(own.key(), op=MPI.MIN))
    state = {"own": [own.epoch, own.step], "model": dict(parts.model.state_dict()),
             "optimizer": optimizer_state(parts.optimizer), "sorter": parts.sampler.state_dict()["sorter"],
             "driver": parts.driver.state_dict(), "rng": rng_state(),
             "progress": dataclasses.asdict(progress), "history": history}
    assert cfg.checkpoint_dir is not None
    checkpoint.save(cfg.checkpoint_dir, checkpoint.Position(lowest.epoch, lowest.step), state, comm,
                    meta={"settings": cfg.resume_settings(comm.size)})


def resume(cfg: TrainConfig, comm: MPI.Comm, parts: Parts) -> Start:
    """Collective: load the latest checkpoint into ``parts`` (``--resume``); where this rank starts."""
    if not cfg.resume:
        return Start()
    assert cfg.checkpoint_dir is not None
    loaded = checkpoint.load_latest(cfg.checkpoint_dir, comm)
    if loaded is None:
        if comm.rank == 0:
            log.info("--resume: no checkpoint in %s: starting from scratch", cfg.checkpoint_dir)
        return Start()
    _check_settings(cfg, (loaded.meta or {}).get("settings", {}), comm.size)
    state = loaded.state
    problem: Optional[str] = None
    try:
        check_contents(state, parts.optimizer)
        parts.model.load_state_dict(state["model"])
        load_optimizer_state(parts.optimizer, state["optimizer"])
        parts.sampler.load_state_dict({"sorter": state["sorter"]})
        parts.driver.load_state_dict(state["driver"])
        set_rng_state(state["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError, UserError) as exc:
        problem = f"--resume: {cfg.checkpoint_dir}: checkpoint does not fit this run ({exc})".splitlines()[0]
    agree(problem, comm)
    _check_places(cfg, [tuple(int(v) for v in own) for own in comm.allgather(state["own"])],
                  (loaded.position.epoch, loaded.position.step))
    p = state["progress"]
    progress = EpochProgress(float(p["loss_sum"]), float(p["elapsed_s"]),
                             {k: float(v) for k, v in p["counters0"].items()})
    cursor = Cursor(*(int(v) for v in state["own"]))
    if comm.rank == 0:
        log.info("resuming from %s at epoch %d step %d", cfg.checkpoint_dir, cursor.epoch + 1, cursor.step)
    return Start(cursor, progress, list(state.get("history", [])))


def _check_settings(cfg: TrainConfig, saved: Dict[str, Any], world_size: int) -> None:
    mine = cfg.resume_settings(world_size)
    for key in sorted(set(saved) | set(mine)):
        was, now = (settings.get(key, RESUME_DEFAULTS.get(key, "(not used)")) for settings in (saved, mine))
        if was != now:
            flag = "ranks" if key == "ranks" else "--" + key.replace("_", "-")
            raise UserError(f"--resume: {cfg.checkpoint_dir} was written with {flag} {was}, "
                            f"this run has {flag} {now}; use the same settings or a new "
                            f"--checkpoint-dir", collective=True)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def check_contents(state: Any, optimizer: torch.optim.Optimizer) -> None:
    """ValueError (one line) unless a loaded state is well-formed: its place, its progress numbers
    and its hyper-parameters (each of the type this run's optimizer has, finite, >= 0). The digest of
    a checkpoint is no seal (anyone can recompute it), so its contents are checked like input."""
    if not isinstance(state, dict):
        raise ValueError(f"the state is a {type(state).__name__}, not a dictionary")
    own = state.get("own")
    if not (isinstance(own, (list, tuple)) and len(own) == 2 and all(type(v) is int and v >= 0 for v in own)):
        raise ValueError(f"its place 'own' must be [epoch, step], two integers >= 0, got {own!r}")
    p = state.get("progress")
    if not (isinstance(p, dict) and _is_number(p.get("loss_sum")) and _is_number(p.get("elapsed_s"))
            and isinstance(p.get("counters0"), dict) and all(_is_number(v) for v in p["counters0"].values())):
        raise ValueError("its 'progress' must hold finite numbers loss_sum, elapsed_s and counters0")
    groups = (state.get("optimizer") or {}).get("param_groups") if isinstance(state.get("optimizer"), dict) \
        else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"its optimizer has {len(groups) if isinstance(groups, list) else 'no'} parameter "
                         f"groups, this run's has {len(optimizer.param_groups)}")
    for i, (saved, mine) in enumerate(zip(groups, optimizer.param_groups)):
        if not isinstance(saved, dict):
            raise ValueError(f"parameter group {i} is not a dictionary")
        for key, now in mine.items():
            if key == "params" or key not in saved:
                continue
            was = saved[key]
            if _is_number(now) and not (_is_number(was) and was >= 0):
                raise ValueError(f"hyper-parameter {key!r} of group {i} must be a finite number >= 0, "
                                 f"got {was!r}")
            if isinstance(now, bool) and not isinstance(was, bool):
                raise ValueError(f"hyper-parameter {key!r} of group {i} must be true or false, got {was!r}")


def _check_places(cfg: TrainConfig, places: List[Any], position: Any) -> None:
    """Collective (every rank has the same ``places``): the ranks' saved places fit the checkpoint's
    position; in a synchronous run every rank is at the same place (else the first step would hang)."""
    where = f"--resume: {cfg.checkpoint_dir}: the checkpoint's files do not belong together"
    low = min(places)
    if low != tuple(position):
        raise UserError(f"{where} (the lowest rank place is epoch {low[0] + 1} step {low[1]}, the "
                        f"checkpoint is at epoch {position[0] + 1} step {position[1]})", collective=True)
    if cfg.sync != "gossip":
        for r, place in enumerate(places):
            if place != places[0]:
                first = places[0]
                raise UserError(f"{where} (rank 0 is at epoch {first[0] + 1} step {first[1]}, rank {r} at "
                                f"epoch {place[0] + 1} step {place[1]}; --sync {cfg.sync} needs one place)",
                                collective=True)
