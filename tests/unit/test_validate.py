"""The data validators (hpc_dgrab.data.validate) and their use where files are read: each rule
refuses a crafted input with one line naming the file and the problem, and passes a sound one."""
import json
import os

import h5py
import numpy as np
import pytest

from hpc_dgrab.data import validate as v
from hpc_dgrab.data.shards import ShardError, make_shards, read_manifest, verify_contents
from hpc_dgrab.data.sources import SourceError, load_npz

X = np.zeros((6, 3), dtype=np.float32)


@pytest.mark.parametrize("x, y, fragment", [
    (np.zeros(6, dtype=np.float32), np.zeros(6, dtype=np.int64),
     "x has shape (6,); it needs one example per row"),
    (X, np.zeros((6, 1), dtype=np.int64), "y has shape (6, 1); it needs one label per example"),
    (X, np.zeros(5, dtype=np.int64), "x has 6 examples but y has 5"),
    (X, np.array([0, 1, 2, -3, 0, 1]), "class labels must be >= 0, y holds -3"),
    (X, np.array([0, 1, 2, 10**12, 0, 1]), "class label 1000000000000 is out of range"),
    (X, np.array(list("abcdef")), "y has dtype <U1; labels must be integers"),
])
def test_arrays_problem_names_the_rule(x, y, fragment):
    problem = v.arrays_problem("d.npz", x, y)
    assert problem is not None and problem.startswith("d.npz: ") and fragment in problem


def test_sound_arrays_pass():
    assert v.arrays_problem("d.npz", X, np.arange(6)) is None
    assert v.arrays_problem("d.npz", X, np.linspace(0, 1, 6)) is None  # float targets


@pytest.mark.parametrize("y, classes, dtype, fragment", [
    (np.array([0, 42, 1]), 10, "int64", "label 42 is outside the manifest's 10 classes (0..9)"),
    (np.array([0, -3, 1]), 10, "int64", "label -3 is outside"),
    (np.array([0.0, 1.0, 2.0], dtype=np.float32), 10, None,
     "dtype float32; the manifest's 10 classes need integers"),
    (np.array([0, 1, 2]), 10, "int32", "labels have dtype int64, manifest says int32"),
    (np.array([0, 1]), 10, "int64", "labels have shape (2,), manifest says 3 labels"),
    (np.array([0, 1, 2]), 0, None, "integer labels but the manifest lists no classes"),
])
def test_labels_problem(y, classes, dtype, fragment):
    problem = v.labels_problem("s.h5", y, 3, classes, dtype)
    assert problem is not None and problem.startswith("s.h5: ") and fragment in problem, problem
    assert v.labels_problem("s.h5", np.array([0, 9, 1]), 3, 10, "int64") is None


def _manifest(**change):
    m = {"num_shards": 2, "num_classes": 2, "num_examples": 5, "x_shape": [3], "x_dtype": "float32",
         "y_dtype": "int64",
         "shards": [{"file": "shard-00000.h5", "count": 3, "class_counts": [1, 2]},
                    {"file": "shard-00001.h5", "count": 2, "class_counts": [1, 1]}],
         "val": {"file": "val.h5", "count": 1, "class_counts": [0, 1]}}
    m.update(change)
    return m


@pytest.mark.parametrize("change, fragment", [
    ({"num_examples": 7}, "num_examples is 7 but the shard files' counts sum to 5"),
    ({"num_classes": "10"}, "num_classes must be an integer"),
    ({"num_classes": 10**12}, "num_classes must be an integer in 0..1000000"),
    ({"x_shape": [0]}, "x_shape must be a non-empty list of integers > 0"),
    ({"x_dtype": "object"}, "x_dtype 'object' is not a numeric dtype"),
    ({"val": {"file": "../val.h5", "count": 1}}, "is not a file name in the directory"),
    ({"val": {"file": "val.h5", "count": -1}}, "val.h5: count must be an integer >= 0"),
    ({"val": {"file": "val.h5", "count": 1, "class_counts": [1, 1]}}, "class_counts sum to 2, count says 1"),
])
def test_manifest_problem(change, fragment):
    problem = v.manifest_problem("m.json", _manifest(**change))
    assert problem is not None and fragment in problem, problem
    assert v.manifest_problem("m.json", _manifest()) is None


def test_file_problem_compares_counts_and_histogram():
    entry = {"file": "a.h5", "count": 3, "class_counts": [1, 2]}
    assert v.file_problem("a.h5", entry, 3, np.array([0, 1, 1]), 2) is None
    assert "holds 4 examples, manifest says 3" in v.file_problem("a.h5", entry, 4, np.zeros(4, int), 2)
    assert "holds 2 examples of class 0, manifest says 1" in v.file_problem("a.h5", entry, 3,
                                                                             np.array([0, 0, 1]), 2)


# -------------------------------------------------------------- where the files are read

def _shards(tmp_path):
    src = str(tmp_path / "d.npz")
    np.savez(src, x=np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32), y=np.arange(60) % 10)
    out = str(tmp_path / "s")
    make_shards(src, out, 2)
    return out


def _rewrite_manifest(root, edit):
    path = os.path.join(root, "manifest.json")
    with open(path) as fh:
        m = json.load(fh)
    edit(m)
    with open(path, "w") as fh:
        json.dump(m, fh)


def _refresh_file_entry(root, i):
    from hpc_dgrab.data.shards import sha256_file

    def edit(m):
        path = os.path.join(root, m["shards"][i]["file"])
        m["shards"][i].update(bytes=os.path.getsize(path), sha256=sha256_file(path))
    return edit


def test_npz_with_one_dimensional_x_is_refused_before_any_shard(tmp_path):
    path = str(tmp_path / "flat.npz")
    np.savez(path, x=np.zeros(10, dtype=np.float32), y=np.zeros(10, dtype=np.int64))
    with pytest.raises(SourceError, match=r"flat\.npz: x has shape \(10,\)"):
        load_npz(path)
    with pytest.raises((SourceError, ShardError)):
        make_shards(path, str(tmp_path / "s"), 2)
    assert not os.path.exists(tmp_path / "s")


def test_label_out_of_range_inside_a_shard_is_one_line_at_open(tmp_path):
    from hpc_dgrab.data import ShardDataset

    root = _shards(tmp_path)
    with h5py.File(os.path.join(root, "shard-00001.h5"), "r+") as f:
        y = f["y"][()]
        y[3] = 42
        f["y"][...] = y
    _rewrite_manifest(root, _refresh_file_entry(root, 1))   # the digest and size recomputed, as anyone can
    ShardDataset(root, 0, 2)  # rank 0's shard is sound
    with pytest.raises(ShardError, match=r"shard-00001\.h5: label 42 is outside the manifest's 10 classes"):
        ShardDataset(root, 1, 2)
    with pytest.raises(ShardError, match="label 42"):
        verify_contents(root, read_manifest(root))


def test_verify_finds_counts_that_disagree_with_the_files(tmp_path):
    root = _shards(tmp_path)
    verify_contents(root, read_manifest(root))

    def shift(m):  # one example moved between the class histograms: the sums still agree
        cc = m["shards"][0]["class_counts"]
        cc[0], cc[1] = cc[0] + 1, cc[1] - 1
    _rewrite_manifest(root, shift)
    with pytest.raises(ShardError, match=r"shard-00000\.h5: holds \d+ examples of class 0, manifest says"):
        verify_contents(root, read_manifest(root))


def test_manifest_with_a_wrong_total_is_refused_at_read(tmp_path):
    root = _shards(tmp_path)
    _rewrite_manifest(root, lambda m: m.update(num_examples=m["num_examples"] + 1))
    with pytest.raises(ShardError, match="num_examples is .* but the shard files' counts sum to"):
        read_manifest(root)
