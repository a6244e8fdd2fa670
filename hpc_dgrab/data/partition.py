"""Partitions of a data set's examples into shards: pure numpy, no I/O, no MPI.

Every function returns a list of ``shards`` sorted int64 index arrays that together hold every
index in ``range(n)`` exactly once (a partition). Which examples go where:

* ``iid``: a seeded random permutation cut into ``shards`` blocks whose sizes differ by at most
  one, so every shard's class histogram is close to the global one.
* ``by-class``: contiguous blocks of classes. With ``shards <= classes`` shard ``i`` holds exactly
  the classes of block ``i`` of ``np.array_split(range(classes), shards)`` (disjoint class sets);
  with more shards than classes every shard holds a single class, each class being split evenly
  over a contiguous block of shards. Not seeded (nothing random).
* ``dirichlet:ALPHA``: for every class a seeded draw ``p ~ Dirichlet(ALPHA, ..., ALPHA)`` over the
  shards, and the class's (shuffled) examples are cut in those proportions. Small ALPHA gives very
  skewed shards, large ALPHA approaches ``iid``. Draws are repeated (with the same seeded
  generator, so still reproducible) up to :data:`DIRICHLET_TRIES` times until no shard is empty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import numpy as np

#: Redraws of a Dirichlet partition that left a shard empty, before giving up.
DIRICHLET_TRIES = 100


class PartitionError(ValueError):
    """A partition that cannot be made; the message is one line for the user."""


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed ``--partition`` value: ``kind`` in iid, by-class, dirichlet; ``alpha`` for dirichlet."""

    kind: str
    alpha: float = 0.0

    def __str__(self) -> str:
        return f"dirichlet:{self.alpha:g}" if self.kind == "dirichlet" else self.kind

    @property
    def needs_labels(self) -> bool:
        """True when the partition needs integer class labels."""
        return self.kind != "iid"


def parse_partition(text: str) -> PartitionSpec:
    """Parse ``iid``, ``by-class`` or ``dirichlet:ALPHA`` (ALPHA a positive finite number)."""
    text = text.strip()
    if text in ("iid", "by-class"):
        return PartitionSpec(text)
    if text.startswith("dirichlet:"):
        raw = text.split(":", 1)[1]
        try:
            alpha = float(raw)
        except ValueError:
            alpha = float("nan")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise PartitionError(f"partition {text!r}: ALPHA must be a positive number, got {raw!r}")
        return PartitionSpec("dirichlet", alpha)
    raise PartitionError(f"unknown partition {text!r}: use iid, by-class or dirichlet:ALPHA")


def _check(n: int, shards: int) -> None:
    if shards < 1:
        raise PartitionError(f"the shard count must be >= 1, got {shards}")
    if n < 0:
        raise PartitionError(f"the example count must be >= 0, got {n}")


def _labels(y: np.ndarray, kind: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise PartitionError(f"partition {kind!r} needs one integer class label per example, "
                             f"got labels of dtype {y.dtype} and shape {y.shape}")
    if y.size and y.min() < 0:
        raise PartitionError(f"partition {kind!r}: class labels must be >= 0, found {int(y.min())}")
    return y


def iid(n: int, shards: int, seed: int = 0) -> List[np.ndarray]:
    """A seeded random partition of ``range(n)`` into ``shards`` near-equal blocks."""
    _check(n, shards)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(block).astype(np.int64) for block in np.array_split(perm, shards)]


def by_class(y: np.ndarray, shards: int, num_classes: int = 0) -> List[np.ndarray]:
    """Contiguous class blocks: every shard holds only its own classes (see the module docstring)."""
    y = _labels(y, "by-class")
    _check(len(y), shards)
    classes = max(int(num_classes), int(y.max()) + 1 if y.size else 0, 1)
    members = [np.flatnonzero(y == c).astype(np.int64) for c in range(classes)]
    if shards <= classes:
        blocks = np.array_split(np.arange(classes), shards)
        return [np.sort(np.concatenate([members[c] for c in block])) for block in blocks]
    parts: List[np.ndarray] = []
    for c, shard_ids in enumerate(np.array_split(np.arange(shards), classes)):
        parts.extend(np.array_split(members[c], len(shard_ids)))
    return [np.asarray(p, dtype=np.int64) for p in parts]


def dirichlet(y: np.ndarray, shards: int, alpha: float, seed: int = 0,
              num_classes: int = 0) -> List[np.ndarray]:
    """Per-class Dirichlet(alpha) proportions over the shards, seeded (see the module docstring)."""
    y = _labels(y, f"dirichlet:{alpha:g}")
    _check(len(y), shards)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise PartitionError(f"dirichlet ALPHA must be a positive number, got {alpha}")
    classes = max(int(num_classes), int(y.max()) + 1 if y.size else 0, 1)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(y == c) for c in range(classes)]
    parts: List[List[np.ndarray]] = []
    for _ in range(DIRICHLET_TRIES):
        parts = [[] for _ in range(shards)]
        for idx in members:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(shards, float(alpha)))
            cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for s, piece in enumerate(np.split(idx, cuts)):
                parts[s].append(piece)
        if all(sum(len(piece) for piece in pieces) for pieces in parts) or len(y) < shards:
            break
    return [np.sort(np.concatenate(pieces)).astype(np.int64) for pieces in parts]


def partition(spec: PartitionSpec | str, y: np.ndarray, shards: int, seed: int = 0,
              num_classes: int = 0) -> List[np.ndarray]:
    """Partition examples with labels ``y`` into ``shards`` by ``spec`` (a PartitionSpec or its text)."""
    if isinstance(spec, str):
        spec = parse_partition(spec)
    if spec.kind == "iid":
        return iid(len(y), shards, seed)
    if spec.kind == "by-class":
        return by_class(y, shards, num_classes)
    return dirichlet(y, shards, spec.alpha, seed, num_classes)
