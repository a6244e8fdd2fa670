"""2 or more MPI ranks (some tests need 3 and skip otherwise): per-rank checkpoint files; one rank's
corrupt newest file makes every rank fall back to the same previous position; a missing rank file
is handled the same way.

Run: launch/local -n 4 -- .venv/bin/python -m pytest -q --only-mpi tests/mpi/test_checkpoint_mpi.py
"""
import os
import shutil
import tempfile

import pytest
import torch

from hpc_dgrab import checkpoint
from hpc_dgrab.checkpoint import Position
from hpc_dgrab.errors import UserError

pytestmark = pytest.mark.mpi


@pytest.fixture
def comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture
def directory(comm):
    d = comm.bcast(tempfile.mkdtemp(prefix="hpc_dgrab-ckpt-mpi-") if comm.rank == 0 else None, root=0)
    yield d
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(d, ignore_errors=True)


def state_of(rank, epoch):
    return {"rank": rank, "epoch": epoch, "w": torch.full((4,), float(10 * rank + epoch))}


def test_one_corrupt_rank_file_makes_all_fall_back(comm, directory):
    if comm.size < 2:
        pytest.skip("needs at least 2 ranks")
    last = comm.size - 1
    for e in (1, 2, 3):
        checkpoint.save(directory, Position(e, 0), state_of(comm.rank, e), comm, keep=3)
    assert sorted(os.listdir(directory)) == sorted(
        [checkpoint.file_name(Position(e, 0), r) for e in (1, 2, 3) for r in range(comm.size)]
        + ["latest.json"])
    if comm.rank == last:  # only the last rank's newest file is truncated
        path = os.path.join(directory, checkpoint.file_name(Position(3, 0), last))
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) - 7])
    comm.Barrier()
    got = checkpoint.load_latest(directory, comm)
    assert got.position == Position(2, 0)
    assert got.state["rank"] == comm.rank and got.state["epoch"] == 2
    assert torch.equal(got.state["w"], torch.full((4,), float(10 * comm.rank + 2)))
    # another rank whose file for epoch 2 is missing too: everyone goes back to epoch 1
    if comm.rank == last - 1:
        os.unlink(os.path.join(directory, checkpoint.file_name(Position(2, 0), last - 1)))
    comm.Barrier()
    got = checkpoint.load_latest(directory, comm)
    assert got.position == Position(1, 0) and got.state["epoch"] == 1 and got.state["rank"] == comm.rank


def test_mid_save_crash_without_pointer_update_uses_pointer(comm, directory):
    if comm.size < 3:
        pytest.skip("needs at least 3 ranks (2 that wrote, one that did not)")
    checkpoint.save(directory, Position(1, 0), state_of(comm.rank, 1), comm)
    # a crash mid-save: ranks 0 and 1 wrote epoch 2, the others and the pointer did not
    if comm.rank < 2:
        checkpoint.write_file(os.path.join(directory, checkpoint.file_name(Position(2, 0), comm.rank)),
                              Position(2, 0), state_of(comm.rank, 2), comm.rank, comm.size)
    comm.Barrier()
    assert checkpoint.load_latest(directory, comm).position == Position(1, 0)
    if comm.rank == 0:
        os.unlink(os.path.join(directory, checkpoint.LATEST))
    comm.Barrier()
    # without the pointer the incomplete epoch 2 is skipped on every rank
    got = checkpoint.load_latest(directory, comm)
    assert got.position == Position(1, 0) and got.state["rank"] == comm.rank


def test_world_size_mismatch_is_collective(comm, directory):
    if comm.size < 3:
        pytest.skip("needs at least 3 ranks (a 2-rank job's files read by a bigger one)")
    sub = comm.Split(0 if comm.rank < 2 else 1, key=comm.rank)
    try:
        if comm.rank < 2:  # a 2-rank job wrote it
            checkpoint.save(directory, Position(1, 0), state_of(sub.rank, 1), sub)
        comm.Barrier()
        with pytest.raises(UserError, match=f"written by 2 ranks, this job has {comm.size}") as info:
            checkpoint.load_latest(directory, comm)
        assert info.value.collective
    finally:
        sub.Free()
