"""GradientExchange over real MPI (run under `launch/local -n 4`): sums, piggyback, state; and the
virtual workers of the benchmarks (several workers per rank), linreg."""
import argparse

import numpy as np
import pytest
import torch

from hpc_dgrab import checkpoint, runtime
from hpc_dgrab.compress import GradientExchange, SparseWorker, make_compressor

pytestmark = pytest.mark.mpi


def _transport(comm):
    from hpc_dgrab.comm import get_transport

    return get_transport("mpi", comm)


def _exchange(method, comm, numel=None, dtype=None, **params):
    return GradientExchange(_transport(comm), make_compressor(method, **params), numel, dtype=dtype)


def _grads(seed, workers, d, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    all_grads = torch.randn(max(workers) + 1, d, generator=g, dtype=dtype)  # identical on every rank
    return [all_grads[w] for w in workers]


@pytest.mark.parametrize("method", ["topk", "regtopk"])
def test_rebuilt_mean_equals_mean_of_selections(method):
    """Every rank's exchange writes sum(selected sparse vectors of all ranks) / N, bit for bit;
    the extra rides along and comes back summed."""
    comm = runtime.world()
    n = comm.size
    d = 50
    ex = _exchange(method, comm, d, dtype=torch.float64, density=0.1, mu=2.0)
    ok = []
    for rnd in range(4):
        grad = _grads(100 + rnd, [comm.rank], d)[0]
        # what this rank will select: a twin worker in the same state, stepped on its own
        twin = SparseWorker(ex.worker.compressor, d, dtype=torch.float64)
        twin.load_state_dict(ex.worker.state_dict())
        pick = twin.compress(grad)
        mean = grad.clone()
        extra_sum = ex.mean_(mean, torch.tensor([float(comm.rank), 1.0]))
        gathered = comm.allgather((pick[0].numpy(), pick[1].numpy()))
        expected = torch.zeros(d, dtype=torch.float64)
        for i, v in gathered:
            expected.index_add_(0, torch.from_numpy(i), torch.from_numpy(v))
        expected /= n
        sent_k = sum(len(i) for i, _ in gathered)
        ok.append((torch.equal(mean, expected), sent_k == n * 5,
                   torch.equal(extra_sum, torch.tensor([n * (n - 1) / 2, float(n)]))))
    all_ok = comm.allgather(ok)
    assert all(all(flags) for rank_ok in all_ok for flags in rank_ok), all_ok


def test_virtual_workers_rebuilt_mean_equals_mean_of_selections():
    """6 virtual workers on the ranks (1 or 2 per rank on 4: ranks send different sizes): every rank
    gets sum(selected sparse vectors of all workers) / N, bit for bit."""
    virtual = pytest.importorskip("benchmarks.virtual")
    comm = runtime.world()
    n_workers, d = 6, 50
    if n_workers < comm.size:
        pytest.skip("more ranks than workers")
    mine = list(virtual.worker_range(n_workers, comm.rank, comm.size))
    ex = virtual.VirtualWorkers("regtopk", d, n_workers, virtual.MPICommunicator(comm),
                                local_workers=len(mine), dtype=torch.float64, density=0.1, mu=2.0)
    ok = []
    for rnd in range(4):
        grads = _grads(100 + rnd, mine, d)
        twins = []
        for w in ex.workers:
            t = SparseWorker(w.compressor, d, dtype=torch.float64)
            t.load_state_dict(w.state_dict())
            twins.append(t)
        picks = [t.compress(g) for t, g in zip(twins, grads)]
        mean = ex.exchange_many(grads)
        gathered = comm.allgather([(i.numpy(), v.numpy()) for i, v in picks])
        expected = torch.zeros(d, dtype=torch.float64)
        for rank_picks in gathered:
            for i, v in rank_picks:
                expected.index_add_(0, torch.from_numpy(i), torch.from_numpy(v))
        expected /= n_workers
        sent_k = sum(len(i) for rank_picks in gathered for i, _ in rank_picks)
        ok.append((torch.equal(mean, expected), sent_k == n_workers * 5))
    all_ok = comm.allgather(ok)
    assert all(all(flags) for rank_ok in all_ok for flags in rank_ok), all_ok


def test_bytes_sent_counts_the_message():
    comm = runtime.world()
    ex = _exchange("topk", comm, 1000, density=0.01)
    ex.mean_(torch.randn(1000), torch.zeros(3))
    total = comm.allreduce(ex.bytes_sent)
    assert ex.bytes_sent == 10 * (4 + 4) + 3 * 4        # int32 indices, float32 values, float32 extra
    assert total == comm.size * ex.bytes_sent


def test_state_round_trips_through_a_checkpoint():
    """Save after 3 rounds (through the checkpoint codec: tensors + JSON), load into a fresh
    exchanger: the next rounds are identical on every rank."""
    comm = runtime.world()
    d = 64
    kwargs = dict(dtype=torch.float64, density=0.125, mu=4.0)
    ex = _exchange("regtopk", comm, d, **kwargs)
    for rnd in range(3):
        ex.mean_(_grads(rnd * 10 + comm.rank, [0], d)[0] * (comm.rank + 1))
    tensors, tree = checkpoint.encode(ex.state_dict())
    resumed = _exchange("regtopk", comm, None, **kwargs)
    resumed.load_state_dict(checkpoint.decode(tensors, tree))
    same = []
    for rnd in range(3, 6):
        g = _grads(rnd * 10 + comm.rank, [0], d)[0] * (comm.rank + 1)
        m1, m2 = g.clone(), g.clone()
        ex.mean_(m1)
        resumed.mean_(m2)
        same.append(torch.equal(m1, m2))
    same.append(ex.bytes_sent == resumed.bytes_sent)
    state_a = ex.worker.states[0]
    state_b = resumed.worker.states[0]
    same.append(all(torch.equal(state_a[k], state_b[k]) for k in ("idx", "val", "agg")))
    same.append(torch.equal(ex.worker.memory.error, resumed.worker.memory.error))
    assert all(all(s) for s in comm.allgather(same))


def test_linear_regression_regtopk_beats_topk_by_orders_of_magnitude():
    """8 virtual workers over the ranks, d = 20, k/d = 0.6, 100 rounds, lr 0.08: Top-k stalls
    (log10 error -0.9 .. -1.8 over seeds 0-5, measured in one process) while RegTop-k keeps
    converging (-10.8 .. -12.4); assert a gap of more than 3 orders of magnitude."""
    pytest.importorskip("benchmarks.virtual")
    from benchmarks.regtopk_linreg import LocalProblems, initial_model, optimum, run_method
    from benchmarks.virtual import MPICommunicator, worker_range

    comm = runtime.world()
    args = argparse.Namespace(workers=8, density=0.6, mu=4.0, q=1e8, rounds=100, lr=0.08)
    problems = LocalProblems(0, worker_range(8, comm.rank, comm.size), 8, 20, 100)
    x_star = optimum(problems, comm)
    w0 = initial_model(0, 20)
    final = {m: run_method(m, problems, x_star, w0, args, MPICommunicator(comm))["log10_err"][-1]
             for m in ("topk", "regtopk")}
    finals = comm.allgather(final)
    assert all(f == finals[0] for f in finals)         # every rank holds the same model
    assert final["regtopk"] < final["topk"] - 3, final
    assert np.isfinite(final["regtopk"])
