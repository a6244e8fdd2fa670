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
        parts.model.load_state_dict(state["model"])
        load_optimizer_state(parts.optimizer, state["optimizer"])
        parts.sampler.load_state_dict({"sorter": state["sorter"]})
        parts.driver.load_state_dict(state["driver"])
        set_rng_state(state["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError, UserError) as exc:
        problem = f"--resume: {cfg.checkpoint_dir}: checkpoint does not fit this run ({exc})".splitlines()[0]
    agree(problem, comm)
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
