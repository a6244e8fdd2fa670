"""What the data layer reads is checked before use: pure functions, one line per problem.

Each function returns ``None`` when the input is sound, else one line naming the file (``where``)
and what is wrong; the callers raise it as a :class:`~hpc_dgrab.data.shards.ShardError` /
:class:`~hpc_dgrab.data.sources.SourceError` (exit 2 on every rank). Nothing here touches MPI or
the file system, so every rule is testable in-process.

The rules:

* arrays (a ``.npz``, a source): ``x`` holds one example per row (at least 2-D), ``y`` is 1-D with
  one label per example; integer labels lie in ``[0, MAX_CLASSES)``;
* labels of a shard file or ``val.h5``: 1-D, one per example, of the manifest's ``y_dtype``, and
  (integer labels) in ``[0, num_classes)`` of the manifest;
* a manifest: its counts and shapes are well-typed, ``num_examples`` is the sum of the shards'
  counts, every file's ``class_counts`` has ``num_classes`` entries summing to its ``count``;
* a file against its manifest entry (``inspect --verify``): its example count and its class
  histogram are those the manifest lists.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

#: more classes than this is taken for a corrupt label, not a data set (a model's output layer has
#: one row per class: a label of 10**12 would ask for terabytes)
MAX_CLASSES = 1_000_000


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def arrays_problem(where: str, x: np.ndarray, y: np.ndarray) -> Optional[str]:
    """Shapes and label type of a data set's ``x`` and ``y``."""
    if x.ndim < 2:
        return (f"{where}: x has shape {tuple(x.shape)}; it needs one example per row "
                "(at least 2-D: examples x features)")
    if y.ndim != 1:
        return f"{where}: y has shape {tuple(y.shape)}; it needs one label per example (1-D)"
    if len(x) != len(y):
        return f"{where}: x has {len(x)} examples but y has {len(y)}"
    if y.dtype.kind not in "iuf":
        return f"{where}: y has dtype {y.dtype}; labels must be integers (or floats for targets)"
    if x.dtype.kind not in "iufb":
        return f"{where}: x has dtype {x.dtype}; inputs must be numbers"
    if y.dtype.kind in "iu" and y.size:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            return f"{where}: class labels must be >= 0, y holds {lo}"
        if hi >= MAX_CLASSES:
            return (f"{where}: class label {hi} is out of range (at most {MAX_CLASSES} classes); "
                    "the labels are corrupt")
    return None


def labels_problem(where: str, y: np.ndarray, count: int, num_classes: int,
                   y_dtype: Optional[str] = None) -> Optional[str]:
    """A shard file's labels against its manifest: shape, dtype, range ``[0, num_classes)``."""
    if y.ndim != 1 or len(y) != count:
        return f"{where}: labels have shape {tuple(y.shape)}, manifest says {count} labels (1-D)"
    if y_dtype is not None and str(y.dtype) != y_dtype:
        return f"{where}: labels have dtype {y.dtype}, manifest says {y_dtype}"
    if num_classes > 0:
        if y.dtype.kind not in "iu":
            return f"{where}: labels have dtype {y.dtype}; the manifest's {num_classes} classes need integers"
        if y.size:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                return (f"{where}: label {bad} is outside the manifest's {num_classes} classes "
                        f"(0..{num_classes - 1})")
    elif y.dtype.kind in "iu":
        return f"{where}: integer labels but the manifest lists no classes (num_classes 0)"
    return None


def _entry_problem(where: str, entry: Any, num_classes: int) -> Optional[str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return f"{where}: a file entry is not an object with a 'file' name"
    name, count = entry["file"], entry.get("count")
    if "/" in name or name in ("", ".", ".."):
        return f"{where}: file entry {name!r} is not a file name in the directory"
    if not _is_int(count) or count < 0:
        return f"{where}: {name}: count must be an integer >= 0, got {count!r}"
    if "bytes" in entry and (not _is_int(entry["bytes"]) or entry["bytes"] < 0):
        return f"{where}: {name}: bytes must be an integer >= 0, got {entry['bytes']!r}"
    counts = entry.get("class_counts", [])
    if num_classes and counts:
        if not isinstance(counts, list) or len(counts) != num_classes or \
                not all(_is_int(c) and c >= 0 for c in counts):
            return f"{where}: {name}: class_counts must be {num_classes} integers >= 0"
        if sum(counts) != count:
            return f"{where}: {name}: class_counts sum to {sum(counts)}, count says {count}"
    return None


def manifest_problem(where: str, m: Dict[str, Any]) -> Optional[str]:
    """A manifest's types and internal consistency (after format/version/keys are known present)."""
    n, shards = m.get("num_shards"), m.get("shards")
    if not _is_int(n) or n < 1:
        return f"{where}: num_shards must be an integer >= 1, got {n!r}"
    if not isinstance(shards, list):
        return f"{where}: 'shards' must be a list of file entries"
    classes = m.get("num_classes", 0)
    if not _is_int(classes) or not 0 <= classes <= MAX_CLASSES:
        return f"{where}: num_classes must be an integer in 0..{MAX_CLASSES}, got {classes!r}"
    shape = m.get("x_shape")
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and d > 0 for d in shape):
        return f"{where}: x_shape must be a non-empty list of integers > 0, got {shape!r}"
    for key in ("x_dtype", "y_dtype"):
        if key in m:
            try:
                if np.dtype(m[key]).kind not in "iufb":
                    raise TypeError
            except TypeError:
                return f"{where}: {key} {m[key]!r} is not a numeric dtype"
    for entry in list(shards) + [m.get("val")]:
        problem = _entry_problem(where, entry, classes)
        if problem:
            return problem
    total = sum(e["count"] for e in shards)
    if "num_examples" in m and m["num_examples"] != total:
        return f"{where}: num_examples is {m['num_examples']!r} but the shard files' counts sum to {total}"
    return None


def file_problem(where: str, entry: Dict[str, Any], file_count: int, y: np.ndarray,
                 num_classes: int) -> Optional[str]:
    """A file's actual example count and class histogram against its manifest entry."""
    if file_count != entry["count"]:
        return f"{where}: holds {file_count} examples, manifest says {entry['count']}"
    counts: Sequence[int] = entry.get("class_counts") or []
    if num_classes and counts and y.dtype.kind in "iu":
        actual = np.bincount(y.astype(np.int64), minlength=num_classes)[:num_classes].tolist()
        if actual != list(counts):
            diff = next(k for k in range(num_classes) if actual[k] != counts[k])
            return (f"{where}: holds {actual[diff]} examples of class {diff}, "
                    f"manifest says {counts[diff]}")
    return None
