"""Compressed exchange over real MPI (run under `launch/local -n 4`): sums, piggyback, state, linreg."""
import argparse

import numpy as np
import pytest
import torch

from hpc_dgrab import checkpoint, runtime
from hpc_dgrab.compress import MPICommunicator, SparseWorker, make_exchanger, worker_range

pytestmark = pytest.mark.mpi


def _grads(seed, workers, d, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    all_grads = torch.randn(max(workers) + 1, d, generator=g, dtype=dtype)  # identical on every rank
    return [all_grads[w] for w in workers]


@pytest.mark.parametrize("method,num_workers", [("topk", None), ("regtopk", None), ("regtopk", 6)])
def test_rebuilt_mean_equals_mean_of_selections(method, num_workers):
    """Every rank's exchanger returns sum(selected sparse vectors of all workers) / N, bit for bit;
    the extra rides along and comes back summed. num_workers=6 on 4 ranks: 1 or 2 workers per rank,
    so ranks send different sizes (Allgatherv)."""
    comm = runtime.world()
    n_workers = num_workers or comm.size
    mine = list(worker_range(n_workers, comm.rank, comm.size))
    d = 50
    ex = make_exchanger(method, d, n_workers, MPICommunicator(comm), local_workers=len(mine),
                        dtype=torch.float64, density=0.1, mu=2.0)
    ok = []
    for rnd in range(4):
        grads = _grads(100 + rnd, mine, d)
        # what each local worker will select: a twin worker in the same state, stepped on its own
        twins = []
        for w in ex.workers:
            t = SparseWorker(w.compressor, d, dtype=torch.float64)
            t.load_state_dict(w.state_dict())
            twins.append(t)
        picks = [t.compress(g) for t, g in zip(twins, grads)]
        extras = [torch.tensor([float(w), 1.0]) for w in mine]
        mean, extra_sum = ex.exchange_many(grads, extras)
        gathered = comm.allgather([(i.numpy(), v.numpy()) for i, v in picks])
        expected = torch.zeros(d, dtype=torch.float64)
        for rank_picks in gathered:
            for i, v in rank_picks:
                expected.index_add_(0, torch.from_numpy(i), torch.from_numpy(v))
        expected /= n_workers
        sent_k = sum(len(i) for rank_picks in gathered for i, _ in rank_picks)
        ok.append((torch.equal(mean, expected), sent_k == n_workers * 5,
                   torch.equal(extra_sum, torch.tensor([n_workers * (n_workers - 1) / 2, float(n_workers)]))))
    all_ok = comm.allgather(ok)
    assert all(all(flags) for rank_ok in all_ok for flags in rank_ok), all_ok


def test_bytes_sent_counts_the_message():
    comm = runtime.world()
    ex = make_exchanger("topk", 1000, comm.size, MPICommunicator(comm), density=0.01)
    ex.exchange(torch.randn(1000), torch.zeros(3))
    total = comm.allreduce(ex.bytes_sent)
    assert ex.bytes_sent == 10 * (4 + 4) + 3 * 4        # int32 indices, float32 values, float32 extra
    assert total == comm.size * ex.bytes_sent


def test_state_round_trips_through_a_checkpoint():
    """Save after 3 rounds (through the checkpoint codec: tensors + JSON), load into a fresh
    exchanger: the next rounds are identical on every rank."""
    comm = runtime.world()
    d = 64
    kwargs = dict(local_workers=1, dtype=torch.float64, density=0.125, mu=4.0)
    ex = make_exchanger("regtopk", d, comm.size, MPICommunicator(comm), **kwargs)
    for rnd in range(3):
        ex.exchange(_grads(rnd * 10 + comm.rank, [0], d)[0] * (comm.rank + 1))
    tensors, tree = checkpoint.encode(ex.state_dict())
    resumed = make_exchanger("regtopk", None, comm.size, MPICommunicator(comm), **kwargs)
    resumed.load_state_dict(checkpoint.decode(tensors, tree))
    same = []
    for rnd in range(3, 6):
        g = _grads(rnd * 10 + comm.rank, [0], d)[0] * (comm.rank + 1)
        m1, _ = ex.exchange(g)
        m2, _ = resumed.exchange(g)
        same.append(torch.equal(m1, m2))
    same.append(ex.bytes_sent == resumed.bytes_sent)
    state_a = ex.workers[0].states[0]
    state_b = resumed.workers[0].states[0]
    same.append(all(torch.equal(state_a[k], state_b[k]) for k in ("idx", "val", "agg")))
    same.append(torch.equal(ex.workers[0].memory.error, resumed.workers[0].memory.error))
    assert all(all(s) for s in comm.allgather(same))


def test_linear_regression_regtopk_beats_topk_by_orders_of_magnitude():
    """8 virtual workers over the ranks, d = 20, k/d = 0.6, 100 rounds, lr 0.08: Top-k stalls
    (log10 error -0.9 .. -1.8 over seeds 0-5, measured in one process) while RegTop-k keeps
    converging (-10.8 .. -12.4); assert a gap of more than 3 orders of magnitude."""
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
