"""HDF5 shards: exact round trips, the reader's modes, ensure_shards, atomic writes, bad input."""
import json
import os

import numpy as np
import pytest
import torch

from hpc_dgrab.data import shards as shards_mod
from hpc_dgrab.data.shards import (
    ShardDataset,
    ShardError,
    ensure_shards,
    make_shards,
    read_manifest,
    shards_for_rank,
    verify_files,
)
from hpc_dgrab.data.sources import SourceError, load_source


def make_npz(path, n=240, classes=6, shape=(1, 5, 5), seed=0):
    """A small image set: random uint8 pixels, labels cycling over the classes."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)
    y = (np.arange(n) % classes).astype(np.int64)
    np.savez(path, x=x, y=y)
    return x, y


@pytest.fixture
def npz(tmp_path):
    path = str(tmp_path / "toy.npz")
    x, y = make_npz(path)
    return path, x, y


def read_all(root, world, split="train", **kw):
    datasets = [ShardDataset(root, r, world, split=split, **kw) for r in range(world)]
    return datasets


@pytest.mark.parametrize("partition", ["iid", "by-class"])
def test_round_trip_exact(tmp_path, npz, partition):
    path, x, y = npz
    out = str(tmp_path / "shards")
    manifest = make_shards(path, out, 4, partition, seed=5, val_fraction=0.25)
    val = ShardDataset(out, split="val")
    assert len(val) == 60 and manifest["val"]["count"] == 60  # 10 of each of 6 classes
    seen = [val.ids()]
    for ds in read_all(out, 4):
        idx = np.arange(len(ds))
        stored = ds.read_x(idx)
        assert stored.dtype == np.uint8
        assert stored.tobytes() == x[ds.ids()].tobytes()  # bytes equal
        assert ds.y.tobytes() == y[ds.ids()].tobytes()
        xb, yb = ds.get_batch(idx)
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert torch.equal(xb, torch.from_numpy(x[ds.ids()].astype(np.float32) * np.float32(1 / 255)))
        assert float(xb.max()) <= 1.0
        seen.append(ds.ids())
    ids = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(ids), np.arange(len(y)))  # every example exactly once
    counts = [e["count"] for e in manifest["shards"]]
    assert sum(counts) == 180
    hist = np.array([e["class_counts"] for e in manifest["shards"]])
    np.testing.assert_array_equal(hist.sum(0), np.full(6, 30))
    if partition == "by-class":  # blocks of classes [0, 1], [2, 3], [4], [5]
        assert [np.flatnonzero(h).tolist() for h in hist] == [[0, 1], [2, 3], [4], [5]]
    else:
        assert max(counts) - min(counts) <= 1


def test_manifest_contents(tmp_path, npz):
    path, x, _ = npz
    out = str(tmp_path / "s")
    m = make_shards(path, out, 2, "dirichlet:2", seed=3, compression="lzf")
    on_disk = read_manifest(out)
    assert on_disk == json.loads(json.dumps(m))
    assert m["version"] == shards_mod.VERSION and m["format"] == shards_mod.FORMAT
    assert m["source"] == "toy" and m["source_spec"] == os.path.abspath(path)
    assert m["partition"] == "dirichlet:2" and m["seed"] == 3 and m["num_shards"] == 2
    assert m["x_shape"] == [1, 5, 5] and m["x_dtype"] == "uint8" and m["y_dtype"] == "int64"
    assert m["num_classes"] == 6 and m["compression"] == "lzf"
    assert m["val_rule"].startswith("seeded stratified holdout of 0.1")
    assert m["val"]["count"] == 24 and m["num_examples"] == 216
    for e in m["shards"] + [m["val"]]:
        file = os.path.join(out, e["file"])
        assert e["sha256"] == shards_mod.sha256_file(file) and e["bytes"] == os.path.getsize(file)
    verify_files(out, m["shards"] + [m["val"]])
    import h5py
    with h5py.File(os.path.join(out, "shard-00000.h5")) as f:
        assert f["x"].compression == "lzf" and f["x"].chunks[0] >= 1 and f["x"].chunks[1:] == (1, 5, 5)


def test_reader_modes_agree_and_restore_order(tmp_path):
    path = str(tmp_path / "big.npz")
    x, y = make_npz(path, n=3000, classes=10, shape=(3, 8, 8))  # 192 B/example: 1365-example chunks
    out = str(tmp_path / "s")
    make_shards(path, out, 8, "iid", val_fraction=0.2)
    rng = np.random.default_rng(0)
    for rank in range(2):  # 4 shards per rank
        cached = ShardDataset(out, rank, 2)
        streaming = ShardDataset(out, rank, 2, cache_bytes=0, chunk_cache_bytes=20_000)
        assert cached.cached and not streaming.cached and len(cached) == 1200
        assert cached.files == [os.path.join(out, f"shard-{i:05d}.h5") for i in range(4 * rank, 4 * rank + 4)]
        for _ in range(5):
            idx = rng.integers(0, len(cached), size=64)  # random order, with repeats
            a, b = cached.get_batch(idx), streaming.get_batch(idx)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            np.testing.assert_array_equal(streaming.read_x(idx), x[streaming.ids(idx)])
        seq = np.arange(100, 164)
        np.testing.assert_array_equal(streaming.read_x(seq), x[streaming.ids(seq)])
        xi, yi = streaming[-1]
        assert xi.shape == (3, 8, 8) and int(yi) == y[streaming.ids()[-1]]
        with pytest.raises(IndexError):
            streaming.get_batch(np.array([len(streaming)]))


def test_val_slices_are_disjoint_and_cover(tmp_path, npz):
    path, x, _ = npz
    out = str(tmp_path / "s")
    make_shards(path, out, 3, val_fraction=0.3)
    whole = ShardDataset(out, split="val")
    parts = [ShardDataset(out, r, 3, split="val", cache_bytes=0) for r in range(3)]
    assert [len(p) for p in parts] == [24, 24, 24]
    np.testing.assert_array_equal(np.concatenate([p.ids() for p in parts]), whole.ids())
    for p in parts:
        assert p.read_x(np.arange(len(p))).tobytes() == x[p.ids()].tobytes()


def test_digits_and_float_targets(tmp_path):
    out = str(tmp_path / "d")
    m = make_shards("digits", out, 4, "by-class")
    assert m["num_examples"] + m["val"]["count"] == 1797 and m["x_dtype"] == "float32"
    ds = ShardDataset(out, 1, 4)
    assert ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert set(np.unique(ds.y).tolist()) == {3, 4, 5}
    src = load_source("digits")
    assert ds.read_x(np.arange(len(ds))).tobytes() == src.x[ds.ids()].tobytes()
    path = str(tmp_path / "reg.npz")
    rng = np.random.default_rng(1)
    np.savez(path, x=rng.normal(size=(50, 3)), y=rng.normal(size=50))
    make_shards(path, str(tmp_path / "r"), 2)
    xb, yb = ShardDataset(str(tmp_path / "r")).get_batch(np.arange(3))
    assert xb.dtype == torch.float32 and yb.dtype == torch.float32
    with pytest.raises(ShardError, match="needs integer class labels"):
        make_shards(path, str(tmp_path / "r2"), 2, "by-class")


def test_official_test_split_rule(tmp_path):
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("fashion-mnist not installed")
    src = load_source("fashion-mnist")
    m = make_shards("fashion-mnist", str(tmp_path / "a"), 2, source=src, compression="none")
    assert m["val"]["count"] == 10000 and m["num_examples"] == 60000
    assert m["val_rule"] == "official test split"
    m = make_shards("fashion-mnist", str(tmp_path / "b"), 2, val_fraction=0.5, source=src, compression="none")
    assert m["val"]["count"] == 30000 and m["num_examples"] == 30000


def test_ensure_shards_reuses_matching_and_rewrites_otherwise(tmp_path, npz):
    path, _, _ = npz
    out = str(tmp_path / "e")
    m1 = ensure_shards(path, out, 2, "iid", seed=1)
    stamp = os.stat(os.path.join(out, "shard-00000.h5")).st_ino
    m2 = ensure_shards(path, out, 2, "iid", seed=1)
    assert m2 == json.loads(json.dumps(m1))
    assert os.stat(os.path.join(out, "shard-00000.h5")).st_ino == stamp  # not rewritten
    m3 = ensure_shards(path, out, 2, "iid", seed=2)
    assert m3["seed"] == 2 and read_manifest(out)["seed"] == 2
    os.remove(os.path.join(out, "shard-00001.h5"))
    ensure_shards(path, out, 2, "iid", seed=2)  # incomplete: rewritten
    assert os.path.isfile(os.path.join(out, "shard-00001.h5"))
    make_npz(path, seed=9)  # same path, new content: rewritten
    stamp = os.stat(os.path.join(out, "shard-00000.h5")).st_ino
    m4 = ensure_shards(path, out, 2, "iid", seed=2)
    assert os.stat(os.path.join(out, "shard-00000.h5")).st_ino != stamp
    assert m4["source_sha256"] == shards_mod.sha256_file(path)
    assert sorted(os.listdir(tmp_path)) == ["e", "toy.npz"]  # no temporary leftovers
    other = tmp_path / "notshards"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(ShardError, match="not a shard directory"):
        ensure_shards(path, str(other), 2)
    assert (other / "precious.txt").read_text() == "keep"


def test_failed_write_leaves_nothing_and_keeps_old_set(tmp_path, npz, monkeypatch):
    path, _, _ = npz
    out = str(tmp_path / "s")
    make_shards(path, out, 2, seed=1)
    before = read_manifest(out)
    real = shards_mod._write_h5
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the set
        return real(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "_write_h5", failing)
    with pytest.raises(KeyboardInterrupt):
        make_shards(path, out, 2, seed=2)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        make_shards(path, str(tmp_path / "new"), 2, seed=2)
    assert sorted(os.listdir(tmp_path)) == ["s", "toy.npz"]
    assert read_manifest(out) == before


# ------------------------------------------------------------------------------------- bad input


@pytest.fixture
def written(tmp_path, npz):
    out = str(tmp_path / "s")
    make_shards(npz[0], out, 4)
    return out


def test_missing_directory(tmp_path):
    with pytest.raises(ShardError, match="no such shard directory") as err:
        ShardDataset(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(err.value) and "\n" not in str(err.value)


def test_missing_shard_file_only_hurts_its_rank(written):
    os.remove(os.path.join(written, "shard-00002.h5"))
    with pytest.raises(ShardError, match=r"shard-00002\.h5: missing shard file"):
        ShardDataset(written, 2, 4)
    assert len(ShardDataset(written, 1, 4)) > 0  # rank 1 opens only its own file


def test_truncated_shard_file(written):
    file = os.path.join(written, "shard-00001.h5")
    size = os.path.getsize(file)
    with open(file, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ShardError, match=rf"shard-00001\.h5: truncated shard file \({size // 2} bytes"):
        ShardDataset(written, 1, 4)


def test_checksum_mismatch_with_verify(written):
    file = os.path.join(written, "shard-00003.h5")
    with open(file, "r+b") as fh:
        fh.seek(os.path.getsize(file) - 10)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    ShardDataset(written, 3, 4)  # same size: only --verify notices
    with pytest.raises(ShardError, match=r"shard-00003\.h5: sha256 mismatch"):
        ShardDataset(written, 3, 4, verify=True)
    ShardDataset(written, 0, 4, verify=True)


def test_unknown_manifest_version(written):
    path = os.path.join(written, "manifest.json")
    m = json.load(open(path))
    m["version"] = 99
    json.dump(m, open(path, "w"))
    with pytest.raises(ShardError, match=r"manifest\.json: unknown manifest version 99"):
        ShardDataset(written)


def test_incompatible_shard_count(written):
    with pytest.raises(ShardError, match="4 shards cannot be split over 3 ranks"):
        ShardDataset(written, 0, 3)
    assert shards_for_rank(4, 1, 2) == [2, 3] and shards_for_rank(4, 3, 4) == [3]
    with pytest.raises(ShardError, match="not in a world"):
        shards_for_rank(4, 4, 4)


def test_npz_length_mismatch(tmp_path):
    path = str(tmp_path / "bad.npz")
    np.savez(path, x=np.zeros((10, 2)), y=np.zeros(9, dtype=np.int64))
    with pytest.raises(SourceError, match=r"bad\.npz: x has 10 examples but y has 9"):
        make_shards(path, str(tmp_path / "s"), 2)
    assert not os.path.exists(tmp_path / "s")


def test_empty_shard_after_partitioning(tmp_path):
    path = str(tmp_path / "holes.npz")
    np.savez(path, x=np.zeros((40, 2), dtype=np.float32), y=np.repeat([0, 2], 20))  # class 1 absent
    with pytest.raises(ShardError, match="leaves shard 1 of 3 empty"):
        make_shards(path, str(tmp_path / "s"), 3, "by-class")
    with pytest.raises(ShardError, match=r"leaves shard 36 of 40 empty \(36 training examples\)"):
        make_shards(path, str(tmp_path / "s"), 40, "iid")  # 36 training examples
    assert sorted(os.listdir(tmp_path)) == ["holes.npz"]


def test_garbled_header_is_a_one_line_error_without_verify(written):
    file = os.path.join(written, "shard-00000.h5")
    with open(file, "r+b") as fh:
        fh.write(bytes(512))
    with pytest.raises(ShardError, match=r"shard-00000\.h5: unreadable shard file") as err:
        ShardDataset(written, 0, 4)
    assert "\n" not in str(err.value)


def test_pickles_for_dataloader_workers(written):
    import pickle

    ds = ShardDataset(written, 1, 4, cache_bytes=0)
    first = ds.get_batch(np.array([3, 0, 5]))
    clone = pickle.loads(pickle.dumps(ds))
    again = clone.get_batch(np.array([3, 0, 5]))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=0)
    assert sum(len(y) for _, y in loader) == len(ds)


def test_chunk_cache_lru_hand_checked():
    from hpc_dgrab.data.reader import ChunkCache

    data = np.arange(47 * 2, dtype=np.int16).reshape(47, 2)  # 5 chunks of 10 rows, the last has 7
    loaded = []

    def load(c):
        loaded.append(c)
        return data[c * 10:(c + 1) * 10]

    cache = ChunkCache(load, 10, 5, (2,), np.int16, budget_bytes=2 * 10 * 2 * 2)  # room for 2 chunks
    assert cache.slots == 2
    np.testing.assert_array_equal(cache.take(np.array([0, 15])), data[[0, 15]])
    np.testing.assert_array_equal(cache.take(np.array([5])), data[[5]])  # hit
    assert loaded == [0, 1]
    np.testing.assert_array_equal(cache.take(np.array([46])), data[[46]])  # evicts chunk 1 (LRU)
    np.testing.assert_array_equal(cache.take(np.array([12])), data[[12]])  # evicts chunk 0
    assert loaded == [0, 1, 4, 1]
    rows = np.array([1, 3, 11, 22, 23, 35, 40, 46])  # 5 chunks through 2 slots: served in groups
    np.testing.assert_array_equal(cache.take(rows), data[rows])
    tiny = ChunkCache(load, 10, 5, (2,), np.int16, budget_bytes=1)  # below one chunk: still one slot
    np.testing.assert_array_equal(tiny.take(rows), data[rows])
    shuffled = np.array([46, 3, 22, 3, 0, 35, 11, 46])  # any order, repeats
    np.testing.assert_array_equal(cache.take(shuffled), data[shuffled])
    np.testing.assert_array_equal(tiny.take(shuffled), data[shuffled])


def test_negative_labels_are_rejected(tmp_path):
    path = str(tmp_path / "signs.npz")
    np.savez(path, x=np.zeros((20, 2), dtype=np.float32), y=np.repeat([-1, 1], 10))
    with pytest.raises((ShardError, SourceError), match=r"signs\.npz: class labels must be >= 0, y holds -1"):
        make_shards(path, str(tmp_path / "s"), 2)
    assert sorted(os.listdir(tmp_path)) == ["signs.npz"]


def test_check_finite_scans_in_blocks_and_names_the_first_bad_example():
    x = np.zeros((50, 3), dtype=np.float64)
    shards_mod.check_finite(x, "x")
    shards_mod.check_finite(np.full((4, 2), 255, dtype=np.uint8), "x")  # integers cannot be non-finite
    x[41, 1], x[12, 0], x[12, 2] = np.inf, np.nan, -np.inf
    for block in (24, 48, 1 << 20):  # 1, 2 and all examples per block
        with pytest.raises(ShardError, match=r"^x holds 3 non-finite value\(s\) \(inf/nan\), the first in example 12;"):
            shards_mod.check_finite(x, "x", block_bytes=block)
    with pytest.raises(ShardError, match="example 1;"):
        shards_mod.check_finite(np.array([1.0, np.nan], dtype=np.float16), "y")
