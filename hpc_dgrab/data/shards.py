"""HDF5 shards: write a data set as one file per shard plus a manifest; read one rank's part.

Layout of a shard directory::

    manifest.json        format, version, source, partition, seed, counts, class histograms,
                         shapes, dtypes, compression, size and sha256 of every file
    shard-00000.h5 ...   datasets ``x`` (chunked along examples, compressed), ``y`` and ``index``
                         (each example's position in the source), one file per shard
    val.h5               the validation split (every rank reads a disjoint contiguous slice of it)

Writing is atomic: everything goes to a temporary directory beside ``out`` which is renamed to
``out`` only when complete; any exception (also Ctrl-C) removes it. Reading opens only the files
of the shards a rank owns, keeps labels in memory, caches the inputs in memory when they are
small (``cache_bytes``) and otherwise reads each batch from HDF5 in sorted runs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch

from hpc_dgrab.cli import UserError
from hpc_dgrab.data.partition import PartitionError, PartitionSpec, parse_partition
from hpc_dgrab.data.partition import partition as make_partition
from hpc_dgrab.data.sources import BUILTIN, Source, SourceError, load_source

log = logging.getLogger(__name__)

FORMAT = "hpc_dgrab-shards"
VERSION = 1
MANIFEST = "manifest.json"
VAL_FILE = "val.h5"
#: Held-out share of the examples for sources without an official test split.
DEFAULT_VAL_FRACTION = 0.1
#: Inputs of a rank up to this many bytes are read once and kept in memory.
DEFAULT_CACHE_BYTES = 256 << 20
#: When streaming (inputs above ``cache_bytes``): decompressed chunks kept per shard file.
DEFAULT_CHUNK_CACHE_BYTES = 32 << 20
#: Target size of one HDF5 chunk of ``x`` (a whole number of examples).
CHUNK_BYTES = 256 << 10
COMPRESSIONS = ("gzip", "lzf", "none")


class ShardError(UserError, ValueError):
    """A shard directory or shard request that cannot be used; the message is one line."""


# ----------------------------------------------------------------------------------------- writing


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chunk_rows(example_shape: Sequence[int], dtype: Any, n: int) -> int:
    """Examples per HDF5 chunk: about :data:`CHUNK_BYTES`, at least 1, at most ``n``."""
    per = int(np.prod(example_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(max(1, min(max(n, 1), CHUNK_BYTES // max(per, 1))))


def _compression_args(compression: str) -> Dict[str, Any]:
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "none":
        return {}
    raise ShardError(f"unknown compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")


def _write_h5(path: str, x: np.ndarray, y: np.ndarray, index: np.ndarray, compression: str) -> int:
    """One shard file; returns the chunk length (examples) used for ``x``."""
    if len(x) == 0:
        raise ShardError(f"{os.path.basename(path)}: refusing to write an empty shard")
    rows = chunk_rows(x.shape[1:], x.dtype, len(x))
    comp = _compression_args(compression)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(rows,) + x.shape[1:], **comp)
        f.create_dataset("y", data=y, chunks=(min(len(y), 1 << 16),) + y.shape[1:], **comp)
        f.create_dataset("index", data=index.astype(np.int64), chunks=(min(len(y), 1 << 16),), **comp)
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
    return rows


def _file_entry(directory: str, name: str, y: np.ndarray, num_classes: int) -> Dict[str, Any]:
    path = os.path.join(directory, name)
    counts = np.bincount(y, minlength=num_classes)[:num_classes].tolist() if num_classes else []
    return {"file": name, "count": int(len(y)), "class_counts": counts,
            "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_shard_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, MANIFEST)) as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out: str) -> None:
    """Raise ShardError unless ``out`` is absent, an empty directory, or an old shard directory."""
    if not os.path.lexists(out):
        return
    if os.path.isdir(out) and not os.path.islink(out) and (not os.listdir(out) or _is_shard_dir(out)):
        return
    raise ShardError(f"{out}: exists and is not a shard directory; refusing to overwrite it")


def _commit(tmp: str, out: str) -> None:
    """Rename the finished temporary directory to ``out`` (replacing an old shard directory)."""
    check_out_dir(out)
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(out) + "-",
                               dir=os.path.dirname(os.path.abspath(out)))
        os.rmdir(old)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def write_shards(source: Source, out: str, shards: int, parts: Sequence[np.ndarray],
                 val_index: Optional[np.ndarray] = None, x_val: Optional[np.ndarray] = None,
                 y_val: Optional[np.ndarray] = None, partition: str = "iid", seed: int = 0, *,
                 compression: str = "gzip", val_ids: Optional[np.ndarray] = None,
                 extra: Optional[Dict[str, Any]] = None) -> dict:
    """Write ``parts[i]`` (indices into ``source.x``) as shard i, plus the validation split.

    The validation split is either ``x_val``/``y_val`` (with ``val_ids`` their positions in their
    own array) or ``source.x[val_index]``. Atomic: ``out`` appears complete or not at all.
    """
    if len(parts) != shards:
        raise ShardError(f"got {len(parts)} parts for {shards} shards")
    for i, idx in enumerate(parts):
        if len(idx) == 0:
            raise ShardError(f"partition {partition!r} leaves shard {i} of {shards} empty "
                             f"({len(source.y)} training examples); use fewer shards or another partition")
    if x_val is None:
        if val_index is None:
            raise ShardError("write_shards needs val_index or x_val/y_val")
        val_ids = np.asarray(val_index, dtype=np.int64)
        x_val, y_val = source.x[val_ids], source.y[val_ids]
    elif val_ids is None:
        val_ids = np.arange(len(x_val), dtype=np.int64)
    if y_val is None or len(x_val) != len(y_val):
        raise ShardError("validation inputs and labels differ in length")
    if len(x_val) == 0:
        raise ShardError("the validation split is empty; use a larger --val-fraction")
    _compression_args(compression)
    check_out_dir(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".shards-" + os.path.basename(out) + "-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        classes = source.num_classes
        entries, rows = [], 1
        for i, idx in enumerate(parts):
            idx = np.asarray(idx, dtype=np.int64)
            name = f"shard-{i:05d}.h5"
            y = source.y[idx]
            rows = _write_h5(os.path.join(tmp, name), source.x[idx], y, idx, compression)
            entries.append(_file_entry(tmp, name, y, classes))
            log.debug("wrote %s (%d examples)", name, len(idx))
        _write_h5(os.path.join(tmp, VAL_FILE), x_val, y_val, val_ids, compression)
        val_entry = _file_entry(tmp, VAL_FILE, y_val, classes)
        manifest = {
            "format": FORMAT, "version": VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source.name, "partition": str(partition), "seed": int(seed),
            "num_shards": int(shards), "num_classes": int(classes),
            "num_examples": int(sum(len(p) for p in parts)),
            "x_shape": list(source.x.shape[1:]), "x_dtype": str(source.x.dtype),
            "y_shape": list(source.y.shape[1:]), "y_dtype": str(source.y.dtype),
            "compression": compression, "chunk_examples": int(rows),
            **(extra or {}),
            "shards": entries, "val": val_entry,
        }
        with open(os.path.join(tmp, MANIFEST), "w") as fh:
            json.dump(manifest, fh, indent=2)
            fh.write("\n")
        _commit(tmp, out)
        log.debug("wrote %d shards of %s to %s", shards, source.name, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def holdout(source: Source, val_fraction: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``source.x`` into (train indices, validation indices), both sorted.

    With integer labels the held-out set is stratified: ``round(val_fraction * count)`` examples
    of every class (at least one example in total).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ShardError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    n = len(source.y)
    rng = np.random.default_rng([int(seed), 0x5EED])
    perm = rng.permutation(n)
    if source.num_classes and source.y.ndim == 1:
        y = source.y[perm]
        picked = []
        for c in range(source.num_classes):
            members = perm[y == c]
            picked.append(members[:int(round(val_fraction * len(members)))])
        val = np.concatenate(picked)
    else:
        val = perm[:int(round(val_fraction * n))]
    if len(val) == 0:
        raise ShardError(f"--val-fraction {val_fraction} holds out no example of {n}; use a larger value")
    if len(val) == n:
        raise ShardError(f"--val-fraction {val_fraction} holds out all {n} examples; use a smaller value")
    mask = np.ones(n, dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask).astype(np.int64), np.sort(val).astype(np.int64)


def _normal_spec(source_spec: str) -> str:
    return source_spec if source_spec in BUILTIN else os.path.abspath(source_spec)


def make_shards(source_spec: str, out: str, shards: int, partition: "str | PartitionSpec" = "iid",
                seed: int = 0, val_fraction: Optional[float] = None, compression: str = "gzip",
                source: Optional[Source] = None) -> dict:
    """Load ``source_spec``, hold out the validation split, partition, write ``out``; the manifest.

    Validation rule: a source with an official test split (fashion-mnist) uses it as the
    validation file unless ``val_fraction`` is given; any other source holds out a seeded,
    class-stratified ``val_fraction`` (default :data:`DEFAULT_VAL_FRACTION`) before partitioning.
    """
    if shards < 1:
        raise ShardError(f"--shards must be >= 1, got {shards}")
    try:
        spec = partition if isinstance(partition, PartitionSpec) else parse_partition(partition)
    except PartitionError as exc:
        raise ShardError(str(exc)) from None
    _compression_args(compression)
    check_out_dir(out)
    if source is None:
        source = load_source(source_spec)
    if spec.needs_labels and not source.num_classes:
        raise ShardError(f"partition {str(spec)!r} needs integer class labels; "
                         f"{source.name} has {source.y.dtype} targets (use iid)")
    extra: Dict[str, Any] = {"source_spec": _normal_spec(source_spec)}
    if val_fraction is None and source.x_test is not None:
        train_idx = np.arange(len(source.y), dtype=np.int64)
        x_val, y_val = source.x_test, source.y_test
        val_ids = np.arange(len(x_val), dtype=np.int64)
        extra.update(val_fraction=None, val_rule="official test split")
    else:
        frac = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
        train_idx, val_idx = holdout(source, frac, seed)
        x_val, y_val, val_ids = source.x[val_idx], source.y[val_idx], val_idx
        extra.update(val_fraction=val_fraction, val_rule=f"seeded stratified holdout of {frac:g}")
    try:
        local = make_partition(spec, source.y[train_idx], shards, seed, source.num_classes)
    except PartitionError as exc:
        raise ShardError(str(exc)) from None
    parts = [train_idx[p] for p in local]
    return write_shards(source, out, shards, parts, x_val=x_val, y_val=y_val, val_ids=val_ids,
                        partition=str(spec), seed=seed, compression=compression, extra=extra)


def manifest_matches(manifest: dict, source_spec: str, shards: int, partition: str, seed: int,
                     val_fraction: Optional[float]) -> bool:
    """True when ``manifest`` was written for exactly these shard parameters."""
    try:
        part = str(parse_partition(partition))
    except PartitionError:
        return False
    return (manifest.get("source_spec") == _normal_spec(source_spec)
            and manifest.get("num_shards") == shards and manifest.get("partition") == part
            and manifest.get("seed") == seed and manifest.get("val_fraction") == val_fraction)


def ensure_shards(source_spec: str, out: str, shards: int, partition: str = "iid", seed: int = 0,
                  val_fraction: Optional[float] = None, compression: str = "gzip") -> dict:
    """Write shards to ``out`` unless it already holds a complete matching set; the manifest.

    "Matching" means the same source, shard count, partition, seed and val_fraction; a matching
    directory whose files are missing or have the wrong size is rewritten. Call it on one rank.
    """
    try:
        manifest = read_manifest(out)
    except ShardError:
        manifest = None
    if manifest is not None and manifest_matches(manifest, source_spec, shards, partition, seed, val_fraction):
        entries = manifest["shards"] + [manifest["val"]]
        if all(_file_problem(out, e) is None for e in entries):
            log.info("reusing shards in %s", out)
            return manifest
    log.info("writing %d %s shards of %s to %s", shards, partition, source_spec, out)
    return make_shards(source_spec, out, shards, partition, seed, val_fraction, compression)


# ----------------------------------------------------------------------------------------- reading


def read_manifest(root: str) -> dict:
    """Load and check ``root/manifest.json`` (format and version)."""
    if not os.path.isdir(root):
        raise ShardError(f"{root}: no such shard directory (create one with: python -m hpc_dgrab.data shard)")
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise ShardError(f"{path}: missing (not a shard directory; create one with "
                         "python -m hpc_dgrab.data shard)")
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable manifest ({str(exc).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a hpc_dgrab shard manifest")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path}: unknown manifest version {manifest.get('version')!r} "
                         f"(this hpc_dgrab reads version {VERSION})")
    for key in ("num_shards", "shards", "val", "x_shape", "x_dtype"):
        if key not in manifest:
            raise ShardError(f"{path}: manifest lacks {key!r}")
    if len(manifest["shards"]) != manifest["num_shards"]:
        raise ShardError(f"{path}: lists {len(manifest['shards'])} shard files for "
                         f"num_shards={manifest['num_shards']}")
    return manifest


def _file_problem(root: str, entry: dict, verify: bool = False) -> Optional[str]:
    """A one-line problem with one listed file (missing, wrong size, checksum), or None."""
    path = os.path.join(root, entry["file"])
    if not os.path.isfile(path):
        return f"{path}: missing shard file"
    size = os.path.getsize(path)
    if "bytes" in entry and size != entry["bytes"]:
        kind = "truncated" if size < entry["bytes"] else "wrong size"
        return f"{path}: {kind} shard file ({size} bytes, manifest says {entry['bytes']})"
    if verify:
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            return (f"{path}: sha256 mismatch (file is {digest[:12]}..., manifest says "
                    f"{str(entry.get('sha256'))[:12]}...); the file changed or is corrupt")
    return None


def verify_files(root: str, entries: Sequence[dict]) -> None:
    """Check existence, size and sha256 of the listed files; ShardError on the first problem."""
    for entry in entries:
        problem = _file_problem(root, entry, verify=True)
        if problem:
            raise ShardError(problem)


def shards_for_rank(num_shards: int, rank: int, world_size: int) -> List[int]:
    """Shard numbers this rank reads: equal blocks; num_shards must be a multiple of world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ShardError(f"rank {rank} is not in a world of size {world_size}")
    if num_shards % world_size != 0:
        raise ShardError(f"{num_shards} shards cannot be split over {world_size} ranks "
                         "(the shard count must equal the world size or be a multiple of it)")
    per = num_shards // world_size
    return list(range(rank * per, (rank + 1) * per))


class _Segment:
    """Rows ``[start, start + count)`` of one shard file, opened lazily.

    Random reads go through an LRU cache of whole HDF5 chunks of ``x`` (at most
    ``chunk_cache_bytes``): a chunk is read (and decompressed) once with one HDF5 call and later
    rows of it are plain numpy indexing.
    """

    def __init__(self, root: str, entry: dict, start: int, count: int, chunk_cache_bytes: int) -> None:
        self.root = root
        self.path = os.path.join(root, entry["file"])
        self.entry, self.start, self.count = entry, start, count
        self.chunk_cache_bytes = chunk_cache_bytes
        self._file: Optional[h5py.File] = None
        self._datasets: Dict[str, h5py.Dataset] = {}
        self._chunks: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._cached_bytes = 0
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
        self._chunks.clear()
        self._cached_bytes = 0

    def fresh(self) -> "_Segment":
        """An unopened copy (for pickling into worker processes)."""
        return _Segment(self.root, self.entry, self.start, self.count, self.chunk_cache_bytes)

    def read(self, name: str, lo: int = 0, hi: Optional[int] = None) -> np.ndarray:
        """Rows ``[lo, hi)`` (segment numbering) of dataset ``name``."""
        hi = self.count if hi is None else hi
        try:
            return self.dataset(name)[self.start + lo:self.start + hi]
        except (OSError, KeyError, RuntimeError) as exc:
            raise ShardError(f"{self.path}: unreadable {name!r} ({str(exc).splitlines()[0]})") from None

    def _chunk(self, ds: h5py.Dataset, c: int, rows: int) -> np.ndarray:
        block = self._chunks.get(c)
        if block is not None:
            self._chunks.move_to_end(c)
            return block
        try:
            block = ds[c * rows:(c + 1) * rows]
        except (OSError, RuntimeError) as exc:
            raise ShardError(f"{self.path}: unreadable 'x' ({str(exc).splitlines()[0]})") from None
        if block.nbytes <= self.chunk_cache_bytes:
            self._chunks[c] = block
            self._cached_bytes += block.nbytes
            while self._cached_bytes > self.chunk_cache_bytes:
                self._cached_bytes -= self._chunks.popitem(last=False)[1].nbytes
        return block

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """``x`` at sorted unique ``rows`` (segment numbering), read chunk by chunk."""
        ds = self.dataset("x")
        per = int(ds.chunks[0]) if ds.chunks else chunk_rows(ds.shape[1:], ds.dtype, ds.shape[0])
        absolute = rows + self.start
        which = absolute // per
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(which)) + 1, [len(rows)]])
        out = np.empty((len(rows),) + ds.shape[1:], dtype=ds.dtype)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            c = int(which[lo])
            out[lo:hi] = self._chunk(ds, c, per)[absolute[lo:hi] - c * per]
        return out


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
            ds = seg.open()
            if "x" not in ds or "y" not in ds:
                raise ShardError(f"{seg.path}: lacks dataset 'x' or 'y'")
            total = int(seg.entry["count"])
            if ds["x"].shape != (total,) + x_shape or ds["x"].dtype != x_dtype or len(ds["y"]) != total:
                raise ShardError(f"{seg.path}: holds x {ds['x'].shape} {ds['x'].dtype} and "
                                 f"{len(ds['y'])} labels, manifest says {total} x {x_shape} {x_dtype}")
            ys.append(seg.read("y"))
            ids.append(seg.read("index") if "index" in ds else
                       np.arange(seg.start, seg.start + seg.count, dtype=np.int64))
        self.y = np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64)
        self._ids = np.concatenate(ids).astype(np.int64)
        self.x_dtype = x_dtype
        self._scale = 1.0 / 255.0 if x_dtype == np.uint8 else 1.0
        self.nbytes = len(self.y) * int(np.prod(x_shape, dtype=np.int64)) * x_dtype.itemsize
        self.cache_bytes = cache_bytes
        self.cached = self.nbytes <= cache_bytes
        self._x: Optional[np.ndarray] = None

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
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self.y)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"index out of range for a dataset of {n} examples")
        indices = np.where(indices < 0, indices + n, indices)
        if self.cached:
            return self.x[indices]
        uniq, inverse = np.unique(indices, return_inverse=True)
        out = np.empty((len(uniq),) + self.input_shape, dtype=self.x_dtype)
        seg_of = np.searchsorted(self._offsets, uniq, side="right") - 1
        for s in np.unique(seg_of):
            where = np.flatnonzero(seg_of == s)
            out[where] = self._segments[s].read_rows(uniq[where] - self._offsets[s])
        return out[inverse.reshape(-1)]

    def get_batch(self, indices: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """Examples ``indices`` (local numbering) as (float32 inputs, labels/targets)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        x = np.asarray(self.read_x(indices), dtype=np.float32)
        if self._scale != 1.0:  # in numpy: torch's thread pool costs more than it saves here
            x = np.multiply(x, np.float32(self._scale), out=x if x.base is None else None)
        y = self.y[indices]
        if np.issubdtype(y.dtype, np.floating):
            y = y.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

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
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


__all__ = ["ShardDataset", "ShardError", "SourceError", "read_manifest", "ensure_shards", "make_shards",
           "write_shards", "holdout", "shards_for_rank", "verify_files", "sha256_file", "FORMAT",
           "VERSION", "DEFAULT_VAL_FRACTION", "DEFAULT_CACHE_BYTES", "COMPRESSIONS"]
