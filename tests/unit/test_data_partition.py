"""Partition properties: every function is a partition of range(n); iid, by-class, dirichlet."""
import numpy as np
import pytest

from hpc_dgrab.data.partition import (
    PartitionError,
    PartitionSpec,
    by_class,
    dirichlet,
    iid,
    parse_partition,
    partition,
)
from tests.helpers import class_histograms


def labels(per_class=(1000,) * 10, seed=0):
    y = np.repeat(np.arange(len(per_class)), per_class)
    return np.random.default_rng(seed).permutation(y).astype(np.int64)


def assert_partition(parts, n):
    assert all(p.dtype == np.int64 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@pytest.mark.parametrize("n,shards", [(0, 1), (1, 1), (10, 3), (1797, 4), (100, 7), (5, 8)])
def test_iid_is_a_partition_with_near_equal_sizes(n, shards):
    parts = iid(n, shards, seed=3)
    assert len(parts) == shards
    assert_partition(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


def test_iid_is_seeded():
    a, b, c = iid(1000, 4, 1), iid(1000, 4, 1), iid(1000, 4, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_class_histograms_close_to_global():
    y = labels()
    hist = class_histograms(y, iid(len(y), 4, seed=0), 10)
    np.testing.assert_array_equal(hist.sum(0), np.full(10, 1000))
    # each shard holds 2500 of 10000 examples: 250 per class expected, sd ~ 13.7 (hypergeometric)
    assert np.abs(hist - 250).max() < 60


def test_by_class_hand_checked():
    y = np.array([0, 0, 1, 1, 2, 2, 3])
    parts = by_class(y, 2)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6]]
    parts = by_class(np.array([2, 0, 1, 0, 2, 1]), 3)
    assert [p.tolist() for p in parts] == [[1, 3], [2, 5], [0, 4]]


def test_by_class_each_shard_holds_only_its_classes():
    y = labels(per_class=(50, 60, 70, 80, 90, 100, 110, 120, 130, 140))
    for shards in (1, 2, 3, 4, 7, 10):
        parts = by_class(y, shards)
        assert_partition(parts, len(y))
        blocks = np.array_split(np.arange(10), shards)
        for part, block in zip(parts, blocks):
            assert set(np.unique(y[part]).tolist()) == set(block.tolist())
            assert len(part) == sum(50 + 10 * c for c in block)


def test_by_class_more_shards_than_classes_splits_classes_over_contiguous_shards():
    y = labels(per_class=(40, 30, 20))
    parts = by_class(y, 5)
    assert_partition(parts, len(y))
    assert [int(np.unique(y[p]).item()) for p in parts] == [0, 0, 1, 1, 2]
    assert [len(p) for p in parts] == [20, 20, 15, 15, 20]


def test_by_class_leaves_absent_classes_empty():
    parts = by_class(np.array([0, 0, 2, 2]), 3)
    assert [len(p) for p in parts] == [2, 0, 2]


def test_dirichlet_is_seeded_partition():
    y = labels(per_class=(200,) * 10)
    a = dirichlet(y, 4, 0.5, seed=7)
    b = dirichlet(y, 4, 0.5, seed=7)
    c = dirichlet(y, 4, 0.5, seed=8)
    assert_partition(a, len(y))
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))
    assert all(len(p) > 0 for p in a)


def test_dirichlet_alpha_controls_skew():
    y = labels(per_class=(500,) * 10)
    skewed = class_histograms(y, dirichlet(y, 4, 0.05, seed=0), 10)
    flat = class_histograms(y, dirichlet(y, 4, 1e4, seed=0), 10)
    for hist in (skewed, flat):
        np.testing.assert_array_equal(hist.sum(0), np.full(10, 500))
    share = lambda h: h.max(1) / h.sum(1)  # noqa: E731 - largest class share per shard
    assert share(skewed).mean() > 0.4
    assert np.abs(flat / flat.sum(1, keepdims=True) - 0.1).max() < 0.03  # near iid


def test_partition_dispatch_and_parse():
    y = labels(per_class=(30,) * 5)
    assert parse_partition("iid") == PartitionSpec("iid")
    assert parse_partition("dirichlet:0.3") == PartitionSpec("dirichlet", 0.3)
    assert str(parse_partition("dirichlet:1e-1")) == "dirichlet:0.1"
    for spec in ("iid", "by-class", "dirichlet:1"):
        assert_partition(partition(spec, y, 3, seed=1), len(y))
    for bad in ("random", "dirichlet:", "dirichlet:-1", "dirichlet:nan", "dirichlet:inf", "by_class"):
        with pytest.raises(PartitionError):
            parse_partition(bad)


def test_label_partitions_reject_float_targets():
    with pytest.raises(PartitionError, match="integer class label"):
        by_class(np.array([0.5, 1.5]), 2)
    with pytest.raises(PartitionError, match="integer class label"):
        dirichlet(np.array([0.5, 1.5]), 2, 1.0)
