"""Per-rank checkpoints with an atomic ``latest.json`` pointer.

Every rank saves its own state (model, optimizer, its sorter's order, its compressor's error
memory, RNG) as ``ckpt-e<EPOCH>-r<RANK>.pt``; after all ranks have saved, rank 0 rewrites
``latest.json``. A crash mid-save leaves the previous checkpoint as the latest. Older epochs
beyond ``keep`` are removed.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Dict, Optional

import torch

from hpc_dgrab import fileio
from hpc_dgrab.cli import agree

log = logging.getLogger(__name__)
LATEST = "latest.json"


def _path(directory: str, epoch: int, rank: int) -> str:
    return os.path.join(directory, f"ckpt-e{epoch:05d}-r{rank:05d}.pt")


def save(directory: str, epoch: int, state: Dict[str, Any], comm: Any, keep: int = 2,
         meta: Optional[Dict[str, Any]] = None) -> None:
    """Collective: every rank writes its state for ``epoch``; then rank 0 moves the pointer."""
    with fileio.atomic_path(_path(directory, epoch, comm.rank)) as tmp:
        torch.save(state, tmp)
    comm.Barrier()
    if comm.rank == 0:
        fileio.write_json(os.path.join(directory, LATEST),
                          {"epoch": epoch, "world_size": comm.size, **(meta or {})})
        for old in glob.glob(os.path.join(directory, "ckpt-e*-r*.pt")):
            old_epoch = int(os.path.basename(old)[6:11])
            if old_epoch <= epoch - keep:
                os.unlink(old)
    comm.Barrier()


def load_latest(directory: str, comm: Any) -> Optional[Dict[str, Any]]:
    """Collective: this rank's state of the latest checkpoint, or None if there is none."""
    pointer = os.path.join(directory, LATEST)
    problem, state = None, None
    latest = None
    if os.path.exists(pointer):
        try:
            with open(pointer) as fh:
                latest = json.load(fh)
            if int(latest["world_size"]) != comm.size:
                problem = (f"{pointer}: checkpoint was written by {latest['world_size']} ranks, "
                           f"this job has {comm.size}")
            else:
                path = _path(directory, int(latest["epoch"]), comm.rank)
                state = torch.load(path, map_location="cpu", weights_only=False)
        except FileNotFoundError as exc:
            problem = f"{pointer}: checkpoint file missing ({exc.filename})"
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            problem = f"{pointer}: unreadable checkpoint ({type(exc).__name__}: {exc})"
    agree(problem, comm)
    if latest is not None:
        log.info("resuming from %s (epoch %d)", directory, int(latest["epoch"]))
    return state
