"""4 MPI ranks: each opens only its own shard file(s) and together they read every example once.

Run: launch/local -n 4 -- .venv/bin/python -m pytest -q --with-mpi --only-mpi tests/mpi/test_data_mpi.py
"""
import hashlib
import os
import shutil
import tempfile

import numpy as np
import pytest

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture(scope="module")
def npz_and_shards(comm):
    """Rank 0 writes a small image npz and shard sets (4 and 8 shards); every rank gets the paths."""
    from hpc_dgrab.data.shards import make_shards

    base = None
    if comm.rank == 0:
        base = tempfile.mkdtemp(prefix="hpc_dgrab-data-mpi-")
        rng = np.random.default_rng(1)
        x = rng.integers(0, 256, size=(402, 1, 6, 6), dtype=np.uint8)
        np.savez(os.path.join(base, "toy.npz"), x=x, y=(np.arange(402) % 7).astype(np.int64))
        make_shards(os.path.join(base, "toy.npz"), os.path.join(base, "s4"), 4, "iid", val_fraction=0.1)
        make_shards(os.path.join(base, "toy.npz"), os.path.join(base, "s8"), 8, "by-class", val_fraction=0.1)
        make_shards(os.path.join(base, "toy.npz"), os.path.join(base, "s3"), 3, "iid", val_fraction=0.1)
    base = comm.bcast(base, root=0)
    with np.load(os.path.join(base, "toy.npz")) as z:
        x = z["x"]
    yield base, x
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(base, ignore_errors=True)


def open_shard_files():
    """Shard files this process has open right now (from /proc/self/fd)."""
    names = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(os.path.join("/proc/self/fd", fd))
        except OSError:
            continue
        if target.endswith(".h5"):
            names.add(os.path.basename(target))
    return names


def digest(row):
    return hashlib.sha256(row.tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("name,per_rank", [("s4", 1), ("s8", 2)])
def test_each_rank_reads_only_its_shards_and_all_see_every_example_once(comm, npz_and_shards, name, per_rank):
    from hpc_dgrab.data.reader import ShardDataset

    base, x = npz_and_shards
    root = os.path.join(base, name)
    ds = ShardDataset(root, comm.rank, comm.size, verify=True, cache_bytes=0)  # streaming: files stay open
    perm = np.random.default_rng(comm.rank).permutation(len(ds))
    xs = np.concatenate([ds.read_x(perm[i:i + 16]) for i in range(0, len(ds), 16)])
    mine = {f"shard-{i:05d}.h5" for i in range(comm.rank * per_rank, (comm.rank + 1) * per_rank)}
    result = {
        "open": open_shard_files(),
        "ids": ds.ids(perm).tolist(),
        "hashes": [digest(r) for r in xs],
        "expected": [digest(x[i]) for i in ds.ids(perm)],
        "mine": mine,
    }
    ds.close()
    val = ShardDataset(root, comm.rank, comm.size, split="val")
    result["val_ids"] = val.ids().tolist()
    everyone = comm.allgather(result)
    n_val = len(np.concatenate([r["val_ids"] for r in everyone]))
    for r in everyone:
        assert r["open"] == r["mine"]  # only its own shard file(s) were opened
        assert r["hashes"] == r["expected"]  # bytes as in the source
    ids = np.concatenate([r["ids"] for r in everyone])
    val_ids = np.concatenate([r["val_ids"] for r in everyone])
    assert len(ids) + n_val == len(x)
    np.testing.assert_array_equal(np.sort(np.concatenate([ids, val_ids])), np.arange(len(x)))  # once each
    assert len(set(val_ids.tolist())) == len(val_ids)


def test_incompatible_shard_count_fails_on_every_rank(comm, npz_and_shards):
    from hpc_dgrab.data.reader import ShardDataset
    from hpc_dgrab.data.shards import ShardError

    base, _ = npz_and_shards
    try:
        ShardDataset(os.path.join(base, "s3"), comm.rank, comm.size)
        message = None
    except ShardError as exc:
        message = str(exc)
    everyone = comm.allgather(message)
    assert all(m == f"3 shards cannot be split over {comm.size} ranks (the shard count must equal the "
               "world size or be a multiple of it)" for m in everyone)


def test_one_truncated_shard_becomes_an_error_on_every_rank(comm, npz_and_shards):
    """A problem only rank 1 sees is agreed on (hpc_dgrab.cli.agree) so that every rank fails alike."""
    from hpc_dgrab.errors import UserError, agree
    from hpc_dgrab.data.reader import ShardDataset
    from hpc_dgrab.data.shards import ShardError

    base, _ = npz_and_shards
    root = os.path.join(base, "broken")
    if comm.rank == 0:
        shutil.copytree(os.path.join(base, "s4"), root)
        with open(os.path.join(root, "shard-00001.h5"), "r+b") as fh:
            fh.truncate(1000)
    comm.Barrier()
    try:
        ShardDataset(root, comm.rank, comm.size)
        problem = None
    except ShardError as exc:
        problem = str(exc)
    try:
        agree(problem, comm)
        final = None
    except UserError as exc:
        final = str(exc)
    everyone = comm.allgather(final)
    assert len(set(everyone)) == 1
    assert everyone[0].startswith(os.path.join(root, "shard-00001.h5") + ": truncated shard file (1000 bytes")
    assert everyone[0].endswith("(rank 1)")
