"""Built-in real data sets, loaded from local files only (never downloaded at run time).

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes).
* ``breast-cancer``: scikit-learn's bundled Wisconsin set (569 x 30 features, 2 classes).
  These two need scikit-learn (the ``[datasets]`` extra); without it, loading them is a
  :class:`SourceError` naming the extra.
* ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` (60k + 10k 28x28 images, 10 classes).
* any ``.npz`` file with arrays ``x`` (features, any shape) and ``y`` (labels or targets).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, Optional

import numpy as np

from hpc_dgrab import extras
from hpc_dgrab.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class SourceError(UserError, ValueError):
    """A data source that cannot be loaded; the message is one line for the user."""


@dataclass
class Source:
    """Arrays of one data set. ``x_test``/``y_test`` are its official test split, if it has one."""

    name: str
    x: np.ndarray
    y: np.ndarray
    x_test: Optional[np.ndarray] = None
    y_test: Optional[np.ndarray] = None

    @property
    def num_classes(self) -> int:
        if not np.issubdtype(self.y.dtype, np.integer):
            return 0
        ys = self.y if self.y_test is None else np.concatenate([self.y, self.y_test])
        return int(ys.max()) + 1 if ys.size else 0


def _read_idx(path: str) -> np.ndarray:
    """Read one (gzipped) IDX file as used by MNIST-style data sets."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise SourceError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SourceError(f"{path}: truncated IDX file ({body.size} of {int(np.prod(dims))} bytes)")
    return body.reshape(dims)


def _idx_file(directory: str, stem: str) -> str:
    for suffix in (".gz", ""):
        path = os.path.join(directory, stem + suffix)
        if os.path.exists(path):
            return path
    raise SourceError(f"fashion-mnist: {os.path.join(directory, stem)}(.gz) not found; "
                      "install it with: apt-get install dataset-fashion-mnist")


def load_fashion_mnist(directory: str = FASHION_MNIST_DIR) -> Source:
    """Fashion-MNIST from Debian's package: uint8 images (N, 1, 28, 28), int64 labels."""
    if not os.path.isdir(directory):
        raise SourceError(f"fashion-mnist: {directory} not found; "
                          "install it with: apt-get install dataset-fashion-mnist")
    x = _read_idx(_idx_file(directory, "train-images-idx3-ubyte"))[:, None]
    y = _read_idx(_idx_file(directory, "train-labels-idx1-ubyte")).astype(np.int64)
    xt = _read_idx(_idx_file(directory, "t10k-images-idx3-ubyte"))[:, None]
    yt = _read_idx(_idx_file(directory, "t10k-labels-idx1-ubyte")).astype(np.int64)
    return Source("fashion-mnist", x, y, xt, yt)


def _sklearn_datasets(name: str) -> ModuleType:
    """``sklearn.datasets``, or a SourceError naming the ``[datasets]`` extra."""
    try:
        return extras.require("sklearn.datasets", f"the {name} data set")
    except UserError as exc:
        raise SourceError(str(exc)) from None


def load_digits() -> Source:
    """scikit-learn's bundled digits: float32 images (N, 1, 8, 8) scaled to [0, 1], int64 labels."""
    bunch = _sklearn_datasets("digits").load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    return Source("digits", x, bunch.target.astype(np.int64))


def load_breast_cancer() -> Source:
    """scikit-learn's bundled breast-cancer set: standardised float32 features, int64 labels."""
    bunch = _sklearn_datasets("breast-cancer").load_breast_cancer()
    x = bunch.data.astype(np.float64)
    x = ((x - x.mean(0)) / (x.std(0) + 1e-12)).astype(np.float32)
    return Source("breast-cancer", x, bunch.target.astype(np.int64))


def load_npz(path: str) -> Source:
    """A ``.npz`` with arrays ``x`` and ``y`` (same first dimension)."""
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise SourceError(f"{path}: needs arrays 'x' and 'y', has {sorted(z.files)}")
            x, y = z["x"], z["y"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"{path}: not a readable .npz file ({exc})") from None
    from hpc_dgrab.data.validate import arrays_problem

    problem = arrays_problem(path, x, y)
    if problem:
        raise SourceError(problem)
    if len(x) == 0:
        raise SourceError(f"{path}: empty data set")
    if np.issubdtype(y.dtype, np.integer):
        y = y.astype(np.int64)
    return Source(os.path.splitext(os.path.basename(path))[0], x, y)


BUILTIN: Dict[str, Callable[[], Source]] = {
    "digits": load_digits,
    "breast-cancer": load_breast_cancer,
    "fashion-mnist": load_fashion_mnist,
}


def load_source(spec: str) -> Source:
    """Load a built-in data set by name, or an ``.npz`` by path."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if spec.endswith(".npz"):
        return load_npz(spec)
    raise SourceError(f"unknown data source {spec!r}: use one of {', '.join(BUILTIN)} or a .npz file")
