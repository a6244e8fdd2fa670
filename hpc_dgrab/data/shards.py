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
small (``cache_bytes``) and otherwise reads each batch from HDF5 chunk by chunk (the reader is in
:mod:`hpc_dgrab.data.reader`, which imports torch; this module does not).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import h5py
import numpy as np

from hpc_dgrab import faults
from hpc_dgrab.data.partition import PartitionError, PartitionSpec, parse_partition
from hpc_dgrab.data.partition import partition as make_partition
from hpc_dgrab.data.sources import BUILTIN, Source, SourceError, load_source
from hpc_dgrab.data.validate import arrays_problem, manifest_problem
from hpc_dgrab.errors import UserError

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


def _fsync(path: str) -> None:
    """Flush a file (or directory) to stable storage, so that a crash after the rename finds data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _file_entry(directory: str, name: str, y: np.ndarray, num_classes: int) -> Dict[str, Any]:
    path = os.path.join(directory, name)
    _fsync(path)
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
                             f"({sum(len(p) for p in parts)} training examples); "
                             "use fewer shards or another partition")
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
            faults.point("shards.file")
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
        _fsync(os.path.join(tmp, MANIFEST))
        _fsync(tmp)
        _commit(tmp, out)
        _fsync(parent)
        log.debug("wrote %d shards of %s to %s", shards, source.name, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_finite(arr: Optional[np.ndarray], what: str, block_bytes: int = 64 << 20) -> None:
    """Raise ShardError if a float (or complex) array holds NaN or infinity, naming the first
    example that does; integer arrays pass. Scans in blocks of examples to bound the memory."""
    if arr is None or arr.size == 0 or not np.issubdtype(arr.dtype, np.inexact):
        return
    per = max(1, arr[:1].nbytes)
    step = max(1, block_bytes // per)
    bad_total, first = 0, None
    kinds: Set[str] = set()
    for lo in range(0, len(arr), step):
        block = arr[lo:lo + step]
        bad = ~np.isfinite(block)
        if bad.any():
            rows = bad.reshape(len(block), -1).any(axis=1)
            if first is None:
                first = lo + int(np.argmax(rows))
            bad_total += int(bad.sum())
            values = block[bad]
            kinds.update(("nan" if np.isnan(v) else "inf") for v in values[:1000])
    if bad_total:
        raise ShardError(f"{what} holds {bad_total} non-finite value(s) ({'/'.join(sorted(kinds))}), "
                         f"the first in example {first}; clean the data (NaN or infinite features "
                         "make training diverge)")


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


def make_shards(source_spec: str, out: str, shards: int, partition: str | PartitionSpec = "iid",
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
    for name, arr in (("x", source.x), ("x_test", source.x_test), ("y", source.y), ("y_test", source.y_test)):
        check_finite(arr, f"{source_spec}: {name}")
    for xs, ys, what in ((source.x, source.y, ""), (source.x_test, source.y_test, " (test split)")):
        problem = None if xs is None or ys is None else arrays_problem(source_spec + what, xs, ys)
        if problem:
            raise ShardError(problem)
    if spec.needs_labels and not source.num_classes:
        raise ShardError(f"partition {str(spec)!r} needs integer class labels; "
                         f"{source.name} has {source.y.dtype} targets (use iid)")
    extra: Dict[str, Any] = {"source_spec": _normal_spec(source_spec)}
    if source_spec not in BUILTIN and os.path.isfile(source_spec):
        extra["source_sha256"] = sha256_file(source_spec)
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
    same = (manifest.get("source_spec") == _normal_spec(source_spec)
            and manifest.get("num_shards") == shards and manifest.get("partition") == part
            and manifest.get("seed") == seed and manifest.get("val_fraction") == val_fraction)
    if same and "source_sha256" in manifest:  # a .npz: its content must not have changed either
        same = os.path.isfile(source_spec) and sha256_file(source_spec) == manifest["source_sha256"]
    return same


def ensure_shards(source_spec: str, out: str, shards: int, partition: str = "iid", seed: int = 0,
                  val_fraction: Optional[float] = None, compression: str = "gzip") -> dict:
    """Write shards to ``out`` unless it already holds a complete matching set; the manifest.

    "Matching" means the same source (for a .npz: same path and sha256), shard count, partition,
    seed and val_fraction (the compression may differ); a matching
    directory whose files are missing or have the wrong size is rewritten. Call it on one rank.
    """
    try:
        manifest = read_manifest(out)
    except ShardError:
        manifest = None
    if manifest is not None and manifest_matches(manifest, source_spec, shards, partition, seed,
                                                 val_fraction):
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
    problem = manifest_problem(path, manifest)
    if problem:
        raise ShardError(problem)
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


def check_files(root: str, entries: Sequence[dict]) -> None:
    """Check that the listed files exist with their manifest sizes; ShardError on the first problem."""
    for entry in entries:
        problem = _file_problem(root, entry, verify=False)
        if problem:
            raise ShardError(problem)


def verify_files(root: str, entries: Sequence[dict]) -> None:
    """Check existence, size and sha256 of the listed files; ShardError on the first problem."""
    for entry in entries:
        problem = _file_problem(root, entry, verify=True)
        if problem:
            raise ShardError(problem)


def verify_contents(root: str, manifest: dict) -> None:
    """Open every listed file: its x shape and dtype, its labels (range, dtype) and its example and
    class counts against the manifest; ShardError on the first problem (``inspect --verify``)."""
    from hpc_dgrab.data.validate import file_problem, labels_problem

    shape, dtype = tuple(manifest["x_shape"]), np.dtype(manifest["x_dtype"])
    classes = int(manifest.get("num_classes", 0))
    for entry in list(manifest["shards"]) + [manifest["val"]]:
        path = os.path.join(root, entry["file"])
        try:
            with h5py.File(path, "r") as f:
                if "x" not in f or "y" not in f:
                    raise ShardError(f"{path}: lacks dataset 'x' or 'y'")
                x_shape, x_dtype, y = f["x"].shape, f["x"].dtype, np.asarray(f["y"][()])
        except OSError as exc:
            raise ShardError(f"{path}: unreadable shard file ({str(exc).splitlines()[0]})") from None
        if tuple(x_shape[1:]) != shape or x_dtype != dtype or len(x_shape) < 1 or x_shape[0] != len(y):
            raise ShardError(f"{path}: holds x {tuple(x_shape)} {x_dtype} and {len(y)} labels, "
                             f"manifest says {entry['count']} x {shape} {dtype}")
        problem = (labels_problem(path, y, len(y), classes, manifest.get("y_dtype"))
                   or file_problem(path, entry, len(y), y, classes))
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


def __getattr__(name: str) -> Any:
    """``ShardDataset`` lives in :mod:`hpc_dgrab.data.reader` (imported lazily: it needs torch)."""
    if name == "ShardDataset":
        from hpc_dgrab.data.reader import ShardDataset

        return ShardDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ShardError", "SourceError", "read_manifest", "ensure_shards", "make_shards",
           "write_shards", "holdout", "shards_for_rank", "check_files", "verify_files", "sha256_file",
           "FORMAT",
           "VERSION", "DEFAULT_VAL_FRACTION", "DEFAULT_CACHE_BYTES", "COMPRESSIONS"]
