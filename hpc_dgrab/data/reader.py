"""The rank-local reader of a shard directory: a torch Dataset over this rank's shard file(s).

Only the files of the shards a rank owns are opened. Labels and example ids are read at start;
inputs are read on first use and kept in memory when they are small (``cache_bytes``), otherwise
every batch is read from HDF5 chunk by chunk through a bounded LRU cache of decompressed chunks.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Dict, Optional, Tuple

import h5py
import numpy as np
import torch

from hpc_dgrab.data.shards import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_CHUNK_CACHE_BYTES,
    ShardError,
    _file_problem,
    chunk_rows,
    read_manifest,
    shards_for_rank,
)
from hpc_dgrab.data.validate import labels_problem

log = logging.getLogger(__name__)


def _as_index(indices: np.ndarray) -> np.ndarray:
    """A 1-d integer index array (no copy when it already is one)."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        idx = idx.astype(np.int64).reshape(-1)
    return idx


def to_float32(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``x`` as float32 times ``scale``, in one pass (numpy: torch's thread pool costs more here)."""
    if scale != 1.0:
        return np.multiply(x, np.float32(scale), dtype=np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


class ChunkCache:
    """An LRU cache of whole chunks of rows, kept in one preallocated array ("slab").

    ``load(c)`` returns rows ``[c * rows, (c + 1) * rows)`` (fewer for the last chunk). A request
    for rows costs one ``load`` per chunk not yet cached and then a single numpy gather,
    so cached chunks cost no Python work per chunk. Holds ``max(1, budget // chunk bytes)``
    chunks (at most ``num_chunks``); a request touching more chunks is served in groups.
    """

    def __init__(self, load: Callable[[int], np.ndarray], rows: int, num_chunks: int,
                 example_shape: Tuple[int, ...], dtype: np.dtype, budget_bytes: int) -> None:
        self.load, self.rows = load, int(rows)
        chunk_bytes = self.rows * int(np.prod(example_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self.slots = int(max(1, min(num_chunks, budget_bytes // max(chunk_bytes, 1))))
        self.example_shape, self.dtype = tuple(example_shape), np.dtype(dtype)
        self._slab: Optional[np.ndarray] = None
        self._slot_of = np.full(max(num_chunks, 1), -1, dtype=np.int64)
        self._chunk_in = np.full(self.slots, -1, dtype=np.int64)
        self._tick = np.full(self.slots, -1, dtype=np.int64)
        self._now = 0
        self.loads = 0

    def _fill(self, chunks: np.ndarray) -> np.ndarray:
        """Make every chunk of ``chunks`` (unique, at most ``slots``) resident; return the slab."""
        if self._slab is None:
            self._slab = np.empty((self.slots, self.rows) + self.example_shape, dtype=self.dtype)
        slab = self._slab
        self._now += 1
        slots = self._slot_of[chunks]
        self._tick[slots[slots >= 0]] = self._now
        for c in chunks[slots < 0]:
            victim = int(np.argmin(self._tick))
            old = self._chunk_in[victim]
            if old >= 0:
                self._slot_of[old] = -1
            block = self.load(int(c))
            slab[victim, :len(block)] = block
            self._slot_of[c], self._chunk_in[victim], self._tick[victim] = victim, c, self._now
            self.loads += 1
        return slab

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The examples at ``rows`` (absolute row numbers; any order, repeats allowed)."""
        which = rows // self.rows
        needed = np.unique(which)
        if len(needed) <= self.slots:
            slab = self._fill(needed)
            return slab[self._slot_of[which], rows - which * self.rows]
        out = np.empty((len(rows),) + self.example_shape, dtype=self.dtype)
        for group in np.array_split(needed, -(-len(needed) // self.slots)):
            slab = self._fill(group)
            sel = (which >= group[0]) & (which <= group[-1])
            out[sel] = slab[self._slot_of[which[sel]], rows[sel] - which[sel] * self.rows]
        return out

    def clear(self) -> None:
        """Drop every cached chunk (and the slab)."""
        self._slab = None
        self._slot_of[:] = -1
        self._chunk_in[:] = -1
        self._tick[:] = -1


class _Segment:
    """Rows ``[start, start + count)`` of one shard file, opened lazily.

    Reads of ``x`` go through a :class:`ChunkCache` of whole HDF5 chunks (``chunk_cache_bytes``):
    a chunk is read (and decompressed) once with one HDF5 call, later rows of it are numpy indexing.
    """

    def __init__(self, root: str, entry: dict, start: int, count: int, chunk_cache_bytes: int) -> None:
        self.root = root
        self.path = os.path.join(root, entry["file"])
        self.entry, self.start, self.count = entry, start, count
        self.chunk_cache_bytes = chunk_cache_bytes
        self._file: Optional[h5py.File] = None
        self._datasets: Dict[str, h5py.Dataset] = {}
        self._cache: Optional[ChunkCache] = None
        self._pid = -1

    def open(self) -> h5py.File:
        """The open HDF5 file (reopened after a fork)."""
        if self._file is None or self._pid != os.getpid():
            self._datasets = {}
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise ShardError(f"{self.path}: unreadable shard file ({str(exc).splitlines()[0]})") from None
            self._pid = os.getpid()
        return self._file

    def dataset(self, name: str) -> h5py.Dataset:
        """An open dataset of this file (kept open across reads)."""
        f = self.open()
        if name not in self._datasets:
            self._datasets[name] = f[name]
        return self._datasets[name]

    def close(self) -> None:
        """Close the file and drop the chunk cache."""
        if self._file is not None and self._pid == os.getpid():
            self._datasets.clear()
            self._file.close()
        self._file = None
        self._datasets = {}
        self._cache = None

    def fresh(self) -> _Segment:
        """An unopened copy (for pickling into worker processes)."""
        return _Segment(self.root, self.entry, self.start, self.count, self.chunk_cache_bytes)

    def read(self, name: str, lo: int = 0, hi: Optional[int] = None) -> np.ndarray:
        """Rows ``[lo, hi)`` (segment numbering) of dataset ``name``."""
        hi = self.count if hi is None else hi
        try:
            return self.dataset(name)[self.start + lo:self.start + hi]
        except (OSError, KeyError, RuntimeError) as exc:
            raise ShardError(f"{self.path}: unreadable {name!r} ({str(exc).splitlines()[0]})") from None

    def _load_chunk(self, c: int, rows: int) -> np.ndarray:
        ds = self.dataset("x")
        try:
            return ds[c * rows:(c + 1) * rows]
        except (OSError, RuntimeError) as exc:
            raise ShardError(f"{self.path}: unreadable 'x' ({str(exc).splitlines()[0]})") from None

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """``x`` at ``rows`` (segment numbering, any order, repeats allowed), through the chunk cache."""
        if self._cache is None or self._pid != os.getpid():
            ds = self.dataset("x")
            per = int(ds.chunks[0]) if ds.chunks else chunk_rows(ds.shape[1:], ds.dtype, ds.shape[0])
            load = functools.partial(self._load_chunk, rows=per)
            self._cache = ChunkCache(load, per, -(-ds.shape[0] // per), ds.shape[1:], ds.dtype,
                                     self.chunk_cache_bytes)
        return self._cache.take(np.asarray(rows, dtype=np.int64) + self.start)


class ShardDataset(torch.utils.data.Dataset):
    """This rank's examples of a shard directory, as a torch Dataset.

    ``split="train"`` opens only this rank's shard file(s) (``num_shards / world_size`` of them);
    ``split="val"`` a disjoint contiguous slice of the validation file. Labels are read at start;
    inputs are read on first use and kept in memory when they take at most ``cache_bytes``,
    otherwise every batch is read from HDF5. ``verify=True`` checks the sha256 of the files
    opened. Images stored as uint8 are returned as float32 in [0, 1]; float targets as float32.
    """

    def __init__(self, root: str, rank: int = 0, world_size: int = 1, split: str = "train",
                 verify: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 chunk_cache_bytes: int = DEFAULT_CHUNK_CACHE_BYTES) -> None:
        self.root = root
        self.manifest = read_manifest(root)
        self.rank, self.world_size, self.split = rank, world_size, split
        if split == "train":
            numbers = shards_for_rank(self.manifest["num_shards"], rank, world_size)
            entries = [self.manifest["shards"][i] for i in numbers]
            ranges = [(0, int(e["count"])) for e in entries]
        elif split == "val":
            if world_size < 1 or not 0 <= rank < world_size:
                raise ShardError(f"rank {rank} is not in a world of size {world_size}")
            entries = [self.manifest["val"]]
            n = int(entries[0]["count"])
            lo, hi = n * rank // world_size, n * (rank + 1) // world_size
            ranges = [(lo, hi - lo)]
        else:
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        for entry in entries:
            problem = _file_problem(root, entry, verify)
            if problem:
                raise ShardError(problem)
        self.files = [os.path.join(root, e["file"]) for e in entries]
        self._segments = [_Segment(root, e, s, c, chunk_cache_bytes) for e, (s, c) in zip(entries, ranges)]
        self._offsets = np.cumsum([0] + [c for _, c in ranges]).astype(np.int64)
        x_shape, x_dtype = tuple(self.manifest["x_shape"]), np.dtype(self.manifest["x_dtype"])
        ys, ids = [], []
        for seg in self._segments:
            y, ids_ = self._check_and_labels(seg, x_shape, x_dtype, self.manifest)
            ys.append(y)
            ids.append(ids_)
        self.y = np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64)
        self._y_out = self.y.astype(np.float32) if np.issubdtype(self.y.dtype, np.floating) else self.y
        self._ids = np.concatenate(ids).astype(np.int64)
        self.x_dtype = x_dtype
        self._scale = 1.0 / 255.0 if x_dtype == np.uint8 else 1.0
        self.nbytes = len(self.y) * int(np.prod(x_shape, dtype=np.int64)) * x_dtype.itemsize
        self.cache_bytes = cache_bytes
        self.cached = self.nbytes <= cache_bytes
        self._x: Optional[np.ndarray] = None

    @staticmethod
    def _check_and_labels(seg: _Segment, x_shape: Tuple[int, ...], x_dtype: np.dtype,
                          manifest: dict) -> Tuple[np.ndarray, np.ndarray]:
        """Check one file's datasets and labels against the manifest; its labels and example ids."""
        try:
            f = seg.open()
            if "x" not in f or "y" not in f:
                raise ShardError(f"{seg.path}: lacks dataset 'x' or 'y'")
            total = int(seg.entry["count"])
            x, y = f["x"], f["y"]
            if x.shape != (total,) + x_shape or x.dtype != x_dtype or len(y) != total:
                raise ShardError(f"{seg.path}: holds x {x.shape} {x.dtype} and {len(y)} labels, "
                                 f"manifest says {total} x {x_shape} {x_dtype}")
            if len(y.shape) != 1:
                raise ShardError(f"{seg.path}: labels have shape {y.shape}; one label per example (1-D)")
            ids = seg.read("index") if "index" in f else np.arange(seg.start, seg.start + seg.count)
            labels = seg.read("y")
            problem = labels_problem(seg.path, labels, seg.count, int(manifest.get("num_classes", 0)),
                                     manifest.get("y_dtype"))
            if problem:
                raise ShardError(problem)
            return labels, np.asarray(ids, dtype=np.int64)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            if isinstance(exc, ShardError):
                raise
            raise ShardError(f"{seg.path}: unreadable shard file ({str(exc).splitlines()[0]})") from None

    # -- facts
    @property
    def num_classes(self) -> int:
        """Number of classes (0 for float targets)."""
        return int(self.manifest.get("num_classes", 0))

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.manifest["x_shape"])

    @property
    def x(self) -> np.ndarray:
        """All of this rank's inputs as stored (reads them all; prefer :meth:`get_batch`)."""
        if self._x is not None:
            return self._x
        x = np.concatenate([seg.read("x") for seg in self._segments])
        if self.cached:
            self._x = x
            self.close()
        return x

    def ids(self, indices: Optional[np.ndarray] = None) -> np.ndarray:
        """Positions in the source (train array, or the test array for an official val split)."""
        return self._ids if indices is None else self._ids[np.asarray(indices)]

    def __len__(self) -> int:
        return len(self.y)

    # -- reading
    def read_x(self, indices: np.ndarray) -> np.ndarray:
        """Inputs at ``indices`` (local numbering) in the stored dtype, in the order given."""
        indices = _as_index(indices)
        if self.cached:
            return self.x[indices]  # numpy checks the bounds and takes negative indices
        n = len(self.y)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"index out of range for a dataset of {n} examples")
        indices = np.where(indices < 0, indices + n, indices)
        if len(self._segments) == 1:
            return self._segments[0].read_rows(indices)
        out = np.empty((len(indices),) + self.input_shape, dtype=self.x_dtype)
        seg_of = np.searchsorted(self._offsets, indices, side="right") - 1
        for s in np.unique(seg_of):
            where = np.flatnonzero(seg_of == s)
            out[where] = self._segments[s].read_rows(indices[where] - self._offsets[s])
        return out

    def get_batch(self, indices: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """Examples ``indices`` (local numbering) as (float32 inputs, labels/targets)."""
        indices = _as_index(indices)
        raw = self._x[indices] if self._x is not None else self.read_x(indices)
        return torch.from_numpy(to_float32(raw, self._scale)), torch.from_numpy(self._y_out[indices])

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(np.asarray([i]))
        return x[0], y[0]

    def close(self) -> None:
        """Close the open HDF5 files (they reopen on the next read)."""
        for seg in self._segments:
            seg.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_segments"] = [seg.fresh() for seg in self._segments]
        state["_x"] = None  # a worker process reads its own copy on first use
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
