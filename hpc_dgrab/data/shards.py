"""HDF5 shards: write a data set as one file per shard plus a manifest; read one rank's part.

Layout of a shard directory::

    manifest.json        format, version, source, partition, counts, shapes, dtypes, sha256
    shard-00000.h5 ...   datasets ``x`` and ``y``, one file per shard
    val.h5               the validation split (every rank reads a disjoint slice of it)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import List, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch

from hpc_dgrab.data.sources import Source

FORMAT = "hpc_dgrab-shards"
VERSION = 1
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard directory that cannot be used; the message is one line for the user."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_h5(path: str, x: np.ndarray, y: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        chunk = (max(1, min(len(x), 1024)),) + x.shape[1:]
        f.create_dataset("x", data=x, chunks=chunk if len(x) else None)
        f.create_dataset("y", data=y)


def write_shards(source: Source, out: str, shards: int, parts: Sequence[np.ndarray],
                 val_index: np.ndarray, x_val: Optional[np.ndarray] = None,
                 y_val: Optional[np.ndarray] = None, partition: str = "iid", seed: int = 0) -> dict:
    """Write ``parts[i]`` (indices into ``source.x``) as shard i and the validation split; atomic."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".shards-", dir=parent)
    try:
        entries = []
        for i, idx in enumerate(parts):
            name = f"shard-{i:05d}.h5"
            _write_h5(os.path.join(tmp, name), source.x[idx], source.y[idx])
            counts = np.bincount(source.y[idx], minlength=source.num_classes).tolist() \
                if source.num_classes else []
            entries.append({"file": name, "count": int(len(idx)), "class_counts": counts,
                            "sha256": _sha256(os.path.join(tmp, name))})
        if x_val is None:
            x_val, y_val = source.x[val_index], source.y[val_index]
        _write_h5(os.path.join(tmp, "val.h5"), x_val, y_val)
        manifest = {
            "format": FORMAT, "version": VERSION, "source": source.name, "partition": partition,
            "seed": seed, "num_shards": shards, "num_classes": source.num_classes,
            "x_shape": list(source.x.shape[1:]), "x_dtype": str(source.x.dtype),
            "y_dtype": str(source.y.dtype), "shards": entries,
            "val": {"file": "val.h5", "count": int(len(x_val)), "sha256": _sha256(os.path.join(tmp, "val.h5"))},
        }
        with open(os.path.join(tmp, MANIFEST), "w") as fh:
            json.dump(manifest, fh, indent=2)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(root: str) -> dict:
    """Load and check ``root/manifest.json``."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise ShardError(f"{root}: no such shard directory")
    if not os.path.isfile(path):
        raise ShardError(f"{path}: missing (not a shard directory; create one with "
                         "python -m hpc_dgrab.data shard)")
    with open(path) as fh:
        manifest = json.load(fh)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardError(f"{path}: unknown manifest format/version "
                         f"{manifest.get('format')!r}/{manifest.get('version')!r}")
    return manifest


def shards_for_rank(num_shards: int, rank: int, world_size: int) -> List[int]:
    """Shard numbers this rank reads: equal blocks; num_shards must be a multiple of world_size."""
    if num_shards % world_size != 0:
        raise ShardError(f"{num_shards} shards cannot be split over {world_size} ranks "
                         "(the shard count must equal the world size or be a multiple of it)")
    per = num_shards // world_size
    return list(range(rank * per, (rank + 1) * per))


class ShardDataset(torch.utils.data.Dataset):
    """This rank's examples of a shard directory, as a torch Dataset.

    ``split="train"`` reads only this rank's shard file(s); ``split="val"`` a disjoint contiguous
    slice of the validation file. Images stored as uint8 are returned as float32 in [0, 1].
    """

    def __init__(self, root: str, rank: int = 0, world_size: int = 1, split: str = "train") -> None:
        self.root = root
        self.manifest = read_manifest(root)
        self.rank, self.world_size = rank, world_size
        if split == "train":
            files = [self.manifest["shards"][i]["file"] for i in
                     shards_for_rank(self.manifest["num_shards"], rank, world_size)]
            xs, ys = zip(*(self._read(f) for f in files))
            self.x, self.y = np.concatenate(xs), np.concatenate(ys)
        elif split == "val":
            x, y = self._read(self.manifest["val"]["file"])
            bounds = np.linspace(0, len(x), world_size + 1).astype(np.int64)
            self.x, self.y = x[bounds[rank]:bounds[rank + 1]], y[bounds[rank]:bounds[rank + 1]]
        else:
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        self._scale = 1.0 / 255.0 if self.x.dtype == np.uint8 else 1.0

    def _read(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        path = os.path.join(self.root, name)
        try:
            with h5py.File(path, "r") as f:
                return f["x"][...], f["y"][...]
        except (OSError, KeyError) as exc:
            raise ShardError(f"{path}: unreadable shard ({exc})") from None

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.manifest["x_shape"])

    def __len__(self) -> int:
        return len(self.y)

    def get_batch(self, indices: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """Examples ``indices`` (local numbering) as (float32 inputs, labels/targets)."""
        x = torch.from_numpy(np.asarray(self.x[indices], dtype=np.float32))
        if self._scale != 1.0:
            x.mul_(self._scale)
        return x, torch.from_numpy(np.asarray(self.y[indices]))

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(np.asarray([i]))
        return x[0], y[0]
