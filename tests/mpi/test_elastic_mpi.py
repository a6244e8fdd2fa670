"""hd.elastic under MPI: commit/restore in memory, resume from the last commit on disk after a
"requeue" (new objects, different initial values on every rank), ElasticSampler's resumed epoch,
and broadcast_object/allgather_object on a process set."""
import os
import shutil
import tempfile

import pytest
import torch
from torch import nn

import hpc_dgrab as hd
from hpc_dgrab import runtime
from hpc_dgrab.tensors import flat_params

pytestmark = pytest.mark.mpi


def _world():
    comm = runtime.world()
    hd.init(comm)
    return comm


def _setup(seed):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  model.named_parameters())
    return model, opt


def _step(model, opt, rank, t):
    g = torch.Generator().manual_seed(100 * t + rank)
    opt.zero_grad()
    model(torch.randn(3, 4, generator=g)).pow(2).sum().backward()
    opt.step()


def test_commit_restore_in_memory():
    comm = _world()
    model, opt = _setup(comm.rank)
    state = hd.elastic.TorchState(model, opt, epoch=0, history=[])
    state.sync()                                   # rank 0's parameters everywhere
    _step(model, opt, comm.rank, 0)
    state.epoch, state.history = 1, [1.5]
    state.commit()
    kept = flat_params(model).clone()
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    _step(model, opt, comm.rank, 1)
    state.epoch = 7
    state.history.append(2.5)
    assert not torch.equal(flat_params(model), kept)
    state.restore()
    assert torch.equal(flat_params(model), kept)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum))
    assert state.epoch == 1 and state.history == [1.5]


def test_requeue_resumes_from_the_last_commit_on_disk():
    comm = _world()
    root = comm.bcast(tempfile.mkdtemp(prefix="elastic-") if comm.rank == 0 else None, root=0)
    ckpt = os.path.join(root, "commits")

    @hd.elastic.run
    def train(state, steps):
        for state.batch in range(state.batch, steps):  # noqa: B020 (Horovod's elastic idiom)
            _step(state.model, state.optimizer, comm.rank, state.batch)
            state.commit()
        return flat_params(state.model).clone()

    model, opt = _setup(comm.rank)
    first = train(hd.elastic.TorchState(model, opt, checkpoint_dir=ckpt, batch=0), 3)
    if comm.rank == 0:
        assert sorted(os.listdir(ckpt)) == ["ckpt-e00000-s0000002-r00000.safetensors",
                                            "ckpt-e00000-s0000003-r00000.safetensors", "latest.json"]
    # the "requeue": new objects, a different initial model on every rank, the directory from the env
    os.environ[hd.elastic.ENV_DIR] = ckpt
    try:
        model2, opt2 = _setup(50 + comm.rank)
        state2 = hd.elastic.TorchState(model2, opt2, batch=0)
        seen = []

        @hd.elastic.run
        def resume(state):
            seen.append((state.batch, flat_params(state.model).clone(), state.commits))

        resume(state2)
    finally:
        del os.environ[hd.elastic.ENV_DIR]
    batch, params, commits = seen[0]
    assert batch == 2 and commits == 3         # the loop variable as committed after the last step
    assert torch.equal(params, first)
    everyone = comm.allgather(params.numpy())
    assert all((e == everyone[0]).all() for e in everyone)
    for p2, p1 in zip(model2.parameters(), model.parameters()):
        assert torch.equal(opt2.state[p2]["momentum_buffer"], opt.state[p1]["momentum_buffer"])
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(root)


def test_elastic_sampler_resumes_an_epoch_without_repeats():
    comm = _world()
    data = list(range(23))
    sampler = hd.elastic.ElasticSampler(data, shuffle=True, seed=3)
    sampler.set_epoch(2)
    mine = list(sampler)
    everyone = comm.allgather(mine)
    assert set(i for e in everyone for i in e) == set(data)
    sampler.record_batch(0, 2)                      # each rank processed its first 2 samples
    state = hd.elastic.ObjectState(sampler=sampler)
    state.sync()                                    # union of the processed sets
    done = set(i for e in everyone for i in e[:2])
    assert set(sampler.processed_indices) == done
    rest = comm.allgather(list(sampler))
    assert set(i for e in rest for i in e) == set(data) - done
    assert sampler.epoch == 2


def test_objects_on_a_process_set():
    from mpi4py import MPI

    comm = _world()
    if comm.size < 2:
        pytest.skip("needs 2 ranks")

    class Odd:
        ranks = [r for r in range(comm.size) if r % 2 == 1]
        split = comm.Split(1 if comm.rank % 2 == 1 else MPI.UNDEFINED, key=comm.rank)
        mpi_comm = None if split == MPI.COMM_NULL else split

        def included(self):
            return self.mpi_comm is not None

    ps = Odd()
    assert hd.allgather_object({"r": comm.rank}) == [{"r": r} for r in range(comm.size)]
    assert hd.broadcast_object(("x", comm.rank), root_rank=comm.size - 1) == ("x", comm.size - 1)
    if not ps.included():
        with pytest.raises(hd.UserError, match="not in the process set"):
            hd.allgather_object(comm.rank, process_set=ps)
        return
    assert hd.allgather_object(comm.rank, name="g", process_set=ps) == ps.ranks
    root = ps.ranks[-1]
    assert hd.broadcast_object([comm.rank], root_rank=root, name="b", process_set=ps) == [root]
    with pytest.raises(hd.UserError, match="root_rank 0 is not in the process set"):
        hd.broadcast_object(1, root_rank=0, process_set=ps)
