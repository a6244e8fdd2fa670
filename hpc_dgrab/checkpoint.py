"""Per-rank checkpoints: tensors plus a JSON tree in safetensors files, an atomic pointer, fallback.

Files in a checkpoint directory::

    ckpt-e{EPOCH:05d}-s{STEP:07d}-r{RANK:05d}.safetensors   one per rank and position
    latest.json                                            the pointer, written by rank 0 last

A position (:class:`Position`) is ``epoch`` epochs completed plus ``step`` steps done inside the
running epoch (0 at an epoch boundary), so a checkpoint may fall mid-epoch.

Format of a rank's file: the tensors of the state (``t0``, ``t1``, ...) and, in the safetensors
metadata, ``format`` (``hpc_dgrab-checkpoint``), ``version``, ``tree`` (the state as strict JSON,
see :func:`encode`), ``digest`` (sha256 over the tree and every tensor's name, dtype and bytes),
``epoch``, ``step``, ``rank``, ``world_size``, ``run_id`` and ``meta``. Loading reads tensors
and JSON only: nothing from disk is unpickled or executed. Old pickle checkpoints (``*.pt``) are never loaded.

:func:`save` (collective) writes every rank's file atomically, then rank 0 writes ``latest.json``
(``position``, ``world_size``, ``meta``, ``run_id``) atomically, then every rank deletes its own
files of positions older than the newest ``keep`` positions *this process wrote*; files other runs
left in the directory are never deleted.

:func:`load_latest` (collective) starts from the pointer's position (or, with the pointer missing
or unreadable, from the newest position on disk, with a warning) and walks back to older positions
until every rank has a valid file for the same one (a truncated or corrupt file is named in a
warning). Every rank returns the same position. A world-size mismatch, or files that exist but of
which no position is valid, is one collective :class:`~hpc_dgrab.errors.UserError`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hpc_dgrab import fileio
from hpc_dgrab.errors import agree

log = logging.getLogger(__name__)

LATEST = "latest.json"
FORMAT = "hpc_dgrab-checkpoint"
VERSION = 1
_FILE_RE = re.compile(r"^ckpt-e(\d{5,})-s(\d{7,})-r(\d{5,})\.safetensors$")
#: Integers beyond this magnitude are stored as decimal strings (JSON readers that use doubles
#: would round them; numpy's PCG64 state holds 128-bit integers).
_SAFE_INT = 2 ** 53


@dataclass(frozen=True, order=True)
class Position:
    """Where a run is: ``epoch`` epochs completed, ``step`` steps done in the running epoch."""

    epoch: int
    step: int

    def __str__(self) -> str:
        return f"epoch {self.epoch} step {self.step}"


@dataclass(frozen=True)
class Loaded:
    """What :func:`load_latest` found: the position, this rank's state, the ``meta`` of the save."""

    position: Position
    state: Any
    meta: Optional[Dict[str, Any]]


# ------------------------------------------------------------------------------- encode / decode


def encode(state: Any) -> Tuple[Dict[str, torch.Tensor], str]:
    """Split ``state`` into named tensors and a strict-JSON tree that refers to them.

    Supported, recursively: dict (str or int keys), OrderedDict (with a torch ``_metadata``
    attribute), list, tuple, torch.Tensor (any dtype safetensors stores), numpy arrays and
    scalars (any non-object dtype, kept byte for byte), int (any size), float (also nan/inf), str,
    bool, None. :func:`decode` gives back an equal structure of the same types. Anything else
    raises TypeError naming its path, e.g. ``state['sorter']['x']``.
    """
    tensors: Dict[str, torch.Tensor] = {}
    tree = _enc(state, "state", tensors)
    return tensors, json.dumps(tree, allow_nan=False, separators=(",", ":"))


def decode(tensors: Dict[str, torch.Tensor], tree: str) -> Any:
    """Inverse of :func:`encode`; raises ValueError on a malformed tree or a missing tensor."""
    try:
        node = json.loads(tree)
    except ValueError as exc:
        raise ValueError(f"checkpoint tree is not JSON: {exc}") from None
    return _dec(node, tensors)


def _enc(x: Any, path: str, tensors: Dict[str, torch.Tensor]) -> Any:
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return x if -_SAFE_INT < x < _SAFE_INT else {"$int": str(x)}
    if t is float:
        return x if math.isfinite(x) else {"$float": repr(x)}
    if t is list:
        return [_enc(v, f"{path}[{i}]", tensors) for i, v in enumerate(x)]
    if t is tuple:
        return {"$tuple": [_enc(v, f"{path}[{i}]", tensors) for i, v in enumerate(x)]}
    if t is dict or t is OrderedDict:
        items = []
        for k, v in x.items():
            if type(k) is not str and type(k) is not int:
                raise TypeError(f"{path}: dict key {k!r} of type {type(k).__name__} cannot be "
                                "checkpointed (only str and int keys)")
            items.append([_enc(k, path, tensors), _enc(v, f"{path}[{k!r}]", tensors)])
        if t is dict:
            return {"$dict": items}
        node: Dict[str, Any] = {"$odict": items}
        if hasattr(x, "_metadata"):
            node["meta"] = _enc(x._metadata, f"{path}._metadata", tensors)
        return node
    if isinstance(x, torch.Tensor) and t in (torch.Tensor, torch.nn.Parameter):
        if x.layout != torch.strided or x.is_quantized:
            raise TypeError(f"{path}: a {x.layout} tensor cannot be checkpointed (dense tensors only)")
        name = f"t{len(tensors)}"
        tensors[name] = x.detach().resolve_conj().resolve_neg().to("cpu", copy=True).contiguous()
        return {"$tensor": name}
    if t is np.ndarray:
        if x.dtype.hasobject or x.dtype.fields is not None:
            raise TypeError(f"{path}: numpy array of dtype {x.dtype} cannot be checkpointed")
        name = f"t{len(tensors)}"
        fortran = bool(x.flags.f_contiguous and not x.flags.c_contiguous)
        raw = np.ascontiguousarray(x.T if fortran else x).reshape(-1).view(np.uint8)
        tensors[name] = torch.from_numpy(raw.copy())
        return {"$ndarray": name, "dtype": x.dtype.str, "shape": list(x.shape), "fortran": fortran}
    if isinstance(x, np.generic) and not isinstance(x, np.object_):
        if x.dtype.fields is not None:
            raise TypeError(f"{path}: numpy scalar of dtype {x.dtype} cannot be checkpointed")
        return {"$npscalar": x.dtype.str, "hex": x.tobytes().hex()}
    raise TypeError(f"{path}: value of type {t.__module__}.{t.__qualname__} cannot be checkpointed")


def _dec(node: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_dec(v, tensors) for v in node]
    if not isinstance(node, dict) or len(node) == 0:
        raise ValueError(f"checkpoint tree: unexpected node {node!r:.80}")
    if "$int" in node:
        return int(node["$int"])
    if "$float" in node:
        text = node["$float"]
        if text not in ("nan", "inf", "-inf"):
            raise ValueError(f"checkpoint tree: bad float {text!r:.40}")
        return float(text)
    if "$tuple" in node:
        return tuple(_dec(v, tensors) for v in node["$tuple"])
    if "$dict" in node or "$odict" in node:
        items = node["$dict"] if "$dict" in node else node["$odict"]
        pairs = [(_key(k), _dec(v, tensors)) for k, v in items]
        if "$dict" in node:
            return dict(pairs)
        out: Any = OrderedDict(pairs)
        if "meta" in node:
            out._metadata = _dec(node["meta"], tensors)
        return out
    if "$tensor" in node:
        return _tensor(node["$tensor"], tensors)
    if "$ndarray" in node:
        raw = _tensor(node["$ndarray"], tensors)
        if raw.dtype != torch.uint8 or raw.dim() != 1:
            raise ValueError("checkpoint tree: numpy array not stored as bytes")
        dtype = np.dtype(node["dtype"])
        if dtype.hasobject:
            raise ValueError(f"checkpoint tree: refusing numpy dtype {dtype}")
        shape = tuple(int(s) for s in node["shape"])
        flat = raw.numpy().copy().view(dtype)
        if node.get("fortran"):
            return flat.reshape(shape[::-1]).T
        return flat.reshape(shape)
    if "$npscalar" in node:
        dtype = np.dtype(node["$npscalar"])
        if dtype.hasobject:
            raise ValueError(f"checkpoint tree: refusing numpy dtype {dtype}")
        return np.frombuffer(bytes.fromhex(node["hex"]), dtype=dtype)[0]
    raise ValueError(f"checkpoint tree: unknown node {sorted(node)!r:.80}")


def _key(k: Any) -> Any:
    if isinstance(k, (str, int)) and not isinstance(k, bool):
        return k
    if isinstance(k, dict) and "$int" in k:
        return int(k["$int"])
    raise ValueError(f"checkpoint tree: bad dict key {k!r:.40}")


def _tensor(name: Any, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    if not isinstance(name, str) or name not in tensors:
        raise ValueError(f"checkpoint tree refers to a missing tensor {name!r:.40}")
    return tensors[name]


def _digest(tensors: Dict[str, torch.Tensor], tree: str) -> str:
    h = hashlib.sha256(tree.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- files


def file_name(position: Position, rank: int) -> str:
    """Name of ``rank``'s file for ``position`` inside a checkpoint directory."""
    return f"ckpt-e{position.epoch:05d}-s{position.step:07d}-r{rank:05d}.safetensors"


def _parse_name(name: str) -> Optional[Tuple[Position, int]]:
    m = _FILE_RE.match(name)
    if not m:
        return None
    return Position(int(m.group(1)), int(m.group(2))), int(m.group(3))


def write_file(path: str, position: Position, state: Any, rank: int, world_size: int,
               run_id: str = "", meta: Optional[Dict[str, Any]] = None) -> None:
    """Write one rank's checkpoint file atomically (fsynced before the rename)."""
    tensors, tree = encode(state)
    metadata = {"format": FORMAT, "version": str(VERSION), "tree": tree, "digest": _digest(tensors, tree),
                "epoch": str(position.epoch), "step": str(position.step), "rank": str(rank),
                "world_size": str(world_size), "run_id": run_id,
                "meta": json.dumps(meta, allow_nan=False)}
    with fileio.atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        _fsync(tmp)


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be used; ``mismatch`` is True for a world-size mismatch."""

    def __init__(self, message: str, mismatch: bool = False) -> None:
        super().__init__(message)
        self.mismatch = mismatch


def read_file(path: str, position: Optional[Position] = None, rank: Optional[int] = None,
              world_size: Optional[int] = None) -> Tuple[Any, Dict[str, str]]:
    """Read and verify one checkpoint file: (state, its safetensors metadata).

    Raises :class:`CheckpointFileError` (one line) for a missing, truncated or corrupt file, an
    unknown format, or one written for another position, rank or world size.
    """
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except FileNotFoundError:
        raise CheckpointFileError(f"{name}: missing") from None
    except Exception as exc:  # SafetensorError, OSError, ...: any failure is this file's, never a hang
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointFileError(f"{name}: unreadable ({why})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointFileError(f"{name}: not a hpc_dgrab checkpoint")
    if metadata.get("version") != str(VERSION):
        raise CheckpointFileError(f"{name}: unknown checkpoint version {metadata.get('version')!r}")
    if world_size is not None and metadata.get("world_size") != str(world_size):
        raise CheckpointFileError(f"{name}: written by {metadata.get('world_size')} ranks, this job has "
                                  f"{world_size}", mismatch=True)
    if ((position is not None and (metadata.get("epoch"), metadata.get("step"))
         != (str(position.epoch), str(position.step)))
            or (rank is not None and metadata.get("rank") != str(rank))):
        raise CheckpointFileError(f"{name}: its contents are of another position or rank")
    tree = metadata.get("tree", "")
    if metadata.get("digest") != _digest(tensors, tree):
        raise CheckpointFileError(f"{name}: corrupt (checksum mismatch)")
    try:
        state = decode(tensors, tree)
    except Exception as exc:  # a malformed tree of any kind
        raise CheckpointFileError(f"{name}: corrupt ({type(exc).__name__}: {str(exc)[:120]})") from None
    return state, metadata


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- save (collective)

_RUN_ID: Optional[str] = None
#: positions this process wrote, per checkpoint directory (what retention may delete)
_WRITTEN: Dict[str, Set[Position]] = {}
_LOCK = threading.Lock()


def run_id(comm: Any) -> str:
    """Collective on first call: an id shared by all ranks of this run (rank 0 draws it)."""
    global _RUN_ID
    if _RUN_ID is None:
        _RUN_ID = comm.bcast(uuid.uuid4().hex if comm.rank == 0 else None, root=0)
    return _RUN_ID


def save(directory: str, position: Position, state: Any, comm: Any, keep: int = 2,
         meta: Optional[Dict[str, Any]] = None) -> None:
    """Collective: every rank writes its ``state`` for ``position``; rank 0 then moves the pointer.

    ``meta`` (plain JSON, the same on every rank) goes into the pointer and every file. Afterwards
    each rank deletes its own files of the positions it wrote before, beyond the newest ``keep``.
    A failed write on any rank is one collective UserError on all ranks; the pointer then still
    names the previous checkpoint.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if not isinstance(position, Position):
        raise TypeError(f"position must be a checkpoint.Position, got {type(position).__name__}")
    if not (type(position.epoch) is int and type(position.step) is int and position.epoch >= 0
            and position.step >= 0):
        raise ValueError(f"position needs integers >= 0, got {position!r}")
    rid = run_id(comm)
    key = os.path.abspath(directory)
    path = os.path.join(directory, file_name(position, comm.rank))
    problem = None
    try:
        write_file(path, position, state, comm.rank, comm.size, rid, meta)
    except OSError as exc:
        problem = f"checkpoint: cannot write {path}: {exc.strerror or exc}"
    except Exception as exc:  # e.g. a value encode() refuses: every rank must still get past agree
        problem = f"checkpoint: cannot save {path}: {type(exc).__name__}: {exc}"
    agree(problem, comm)  # also the barrier: every file is complete before the pointer moves
    with _LOCK:
        _WRITTEN.setdefault(key, set()).add(position)
    if comm.rank == 0:
        try:
            fileio.write_json(os.path.join(directory, LATEST), {
                "format": FORMAT, "version": VERSION,
                "position": {"epoch": position.epoch, "step": position.step},
                "world_size": comm.size, "meta": meta, "run_id": rid})
        except OSError as exc:
            problem = f"checkpoint: cannot write {os.path.join(directory, LATEST)}: {exc.strerror or exc}"
    agree(problem, comm)
    with _LOCK:
        mine = sorted(_WRITTEN[key], reverse=True)
        old = mine[keep:]
        _WRITTEN[key] = set(mine[:keep])
    for pos in old:
        try:
            os.unlink(os.path.join(directory, file_name(pos, comm.rank)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("checkpoint: could not delete %s: %s", file_name(pos, comm.rank), exc)


# ------------------------------------------------------------------------ load (collective)


@dataclass(frozen=True)
class _Survey:
    """Rank 0's view of a directory, broadcast so that every rank walks the same positions."""

    candidates: List[Position]
    pointer: Optional[Dict[str, Any]]
    problem: Optional[str]
    warnings: List[str]
    any_files: bool


def _read_pointer(directory: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    path = os.path.join(directory, LATEST)
    if not os.path.exists(path):
        return None, f"{path} is missing"
    try:
        with open(path) as fh:
            data = json.load(fh)
        pos = Position(int(data["position"]["epoch"]), int(data["position"]["step"]))
        return {"position": pos, "world_size": int(data["world_size"]), "meta": data.get("meta")}, None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{path} is unreadable ({type(exc).__name__}: {str(exc)[:80]})"


def _survey(directory: str, world_size: int) -> _Survey:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return _Survey([], None, None, [], False)
    except OSError as exc:
        return _Survey([], None, f"{directory}: cannot list checkpoint directory: {exc.strerror or exc}",
                       [], True)
    positions: Set[Position] = set()
    for name in names:
        parsed = _parse_name(name)
        if parsed:
            positions.add(parsed[0])
    pickles = [n for n in names if n.endswith(".pt") and not n.startswith(".")]
    warnings: List[str] = []
    if pickles:
        if not positions:
            return _Survey([], None, f"{directory}: holds only pickle checkpoints ({pickles[0]}, ...), "
                           "which are never loaded because unpickling can run code; move them away "
                           "to start afresh", [], True)
        warnings.append(f"{directory}: ignoring {len(pickles)} pickle (.pt) file(s); they are never loaded")
    pointer, pointer_problem = _read_pointer(directory)
    if not positions:
        if pointer is not None:
            return _Survey([], None, f"{directory}: {LATEST} names {pointer['position']} but no "
                           "checkpoint file is there", [], True)
        return _Survey([], None, None, warnings, False)
    if pointer is not None and pointer["world_size"] != world_size:
        return _Survey([], None, f"{directory}: checkpoint was written by {pointer['world_size']} ranks, "
                       f"this job has {world_size}", [], True)
    ordered = sorted(positions, reverse=True)
    if pointer is None:
        warnings.append(f"{pointer_problem}: using the newest valid checkpoint in {directory}")
    else:
        ordered = [p for p in ordered if p <= pointer["position"]] or ordered
    return _Survey(ordered, pointer, None, warnings, True)


def load_latest(directory: str, comm: Any) -> Optional[Loaded]:
    """Collective: the newest valid checkpoint in ``directory`` (this rank's state), or None when
    the directory holds no checkpoint at all. See the module docstring for the fallback rules."""
    survey = None
    if comm.rank == 0:
        try:
            survey = _survey(directory, comm.size)
        except Exception as exc:  # never leave the other ranks waiting in the broadcast
            survey = _Survey([], None, f"{directory}: cannot inspect checkpoints: "
                             f"{type(exc).__name__}: {exc}", [], True)
    survey = comm.bcast(survey, root=0)
    agree(survey.problem, comm)
    if comm.rank == 0:
        for w in survey.warnings:
            log.warning("%s", w)
    if not survey.candidates:
        return None
    rejected: List[str] = []
    for pos in survey.candidates:
        path = os.path.join(directory, file_name(pos, comm.rank))
        state, metadata, err, mismatch = None, None, None, False
        try:
            state, metadata = read_file(path, pos, comm.rank, comm.size)
        except CheckpointFileError as exc:
            err, mismatch = str(exc), exc.mismatch
        results = comm.allgather((err, mismatch))
        mismatches = [e for e, m in results if m]
        agree(f"{directory}: {mismatches[0]}" if mismatches else None, comm)
        errors = [e for e, _ in results if e is not None]
        if not errors:
            if rejected and comm.rank == 0:
                log.warning("checkpoint: falling back to %s in %s (%s)", pos, directory, "; ".join(rejected))
            if comm.rank == 0:
                log.info("resuming from %s (%s)", directory, pos)
            pointer = survey.pointer
            if pointer is not None and pointer["position"] == pos:
                meta = pointer["meta"]
            else:
                # no rank reported an error, so this rank's read_file returned its metadata
                assert metadata is not None
                try:
                    meta = json.loads(metadata.get("meta", "null"))
                except ValueError:
                    meta = None
            return Loaded(pos, state, meta)
        for e in errors:
            if comm.rank == 0:
                log.warning("checkpoint: %s: %s is not usable: %s", directory, pos, e)
        rejected.append(errors[0])
    agree(f"{directory}: no valid checkpoint ({len(survey.candidates)} position(s) tried; newest: "
          f"{rejected[0]})", comm)
    return None  # not reached: agree raised on every rank
