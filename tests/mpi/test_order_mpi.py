"""D-GraB on 4 MPI ranks: exact mode equals the single-process coordinated fold; every rank holds
the same running sum and takes the same signs; the payload rides in the gradient all-reduce."""
import hashlib

import numpy as np
import pytest
import torch

from hpc_dgrab import runtime
from hpc_dgrab.compress import GradientExchange
from hpc_dgrab.models import build_model
from hpc_dgrab.order import make_sorter
from hpc_dgrab.order.balance import coordinated_pair_balance
from tests.helpers import FlatSync, transport

pytestmark = pytest.mark.mpi


def _digest(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _run_sorters(mode, m, d, batch, epochs, dtype=torch.float64, payload="full"):
    """Drive this rank's D-GraB sorter through the real all-reduce; everything gathered to all."""
    comm = runtime.world()
    n, rank = comm.size, comm.rank
    ex = GradientExchange(transport())
    sorter = make_sorter("dgrab", m, seed=11, rank=rank, world_size=n, mode=mode, payload=payload)
    rng = np.random.default_rng(5)
    record = []
    for _ in range(epochs):
        g_all = [rng.normal(size=(m, d)) for _ in range(n)]  # every rank draws all ranks' data
        start = comm.allgather(sorter.epoch_order().copy())
        mine = torch.from_numpy(g_all[rank]).to(dtype)
        sums = []
        order = sorter.epoch_order()
        for lo in range(0, m, batch):
            idx = order[lo:lo + batch]
            payload = sorter.observe(mine[idx], [(int(i),) for i in idx])
            total = ex.mean_(torch.zeros(3, dtype=dtype), payload)
            sorter.apply_payload(total)
            sums.append(_digest(sorter.running_sum) if sorter.running_sum is not None else "")
        sorter.end_epoch()
        assert comm.allgather(sorter.diverged_steps) == [0] * n  # the in-band digest check saw no divergence
        record.append((g_all, start, comm.allgather(sorter.epoch_order().copy()),
                       comm.allgather([s.copy() for s in sorter.last_epoch_signs]), comm.allgather(sums)))
    return record


def test_exact_mode_equals_single_process_coordinated_fold():
    comm = runtime.world()
    for g_all, start, orders, signs, sums in _run_sorters("exact", m=9, d=6, batch=4, epochs=3):
        ref_orders, ref_signs = coordinated_pair_balance(g_all, start, "exact")
        for r in range(comm.size):
            assert np.array_equal(orders[r], ref_orders[r])
            got = np.concatenate([s for s in signs[r] if len(s)])
            assert np.array_equal(got, ref_signs)  # every rank computed every rank's sign, identically
        assert all(s == sums[0] for s in sums)  # bit-identical running sums after every step


def test_parallel_mode_equals_simulation_and_ranks_agree():
    for g_all, start, orders, signs, sums in _run_sorters("parallel", m=12, d=5, batch=2, epochs=3):
        ref_orders, ref_signs = coordinated_pair_balance(g_all, start, "parallel")
        for r in range(len(orders)):
            assert np.array_equal(orders[r], ref_orders[r])
            assert np.array_equal(np.concatenate(signs[r]), ref_signs[:, r])
        assert all(s == sums[0] for s in sums)


def test_half_payload_equals_simulation_and_ranks_agree():
    for g_all, start, orders, signs, sums in _run_sorters("parallel", m=12, d=5, batch=2, epochs=3,
                                                          payload="half"):
        ref_orders, ref_signs = coordinated_pair_balance(g_all, start, "parallel-half")
        for r in range(len(orders)):
            assert sorted(orders[r].tolist()) == list(range(12))
            assert np.array_equal(orders[r], ref_orders[r])
            assert np.array_equal(np.concatenate(signs[r]), ref_signs[:, r])
        assert all(s == sums[0] for s in sums)  # bit-identical shared sums after every step


@pytest.mark.parametrize("mode,payload", [("parallel", "full"), ("parallel", "half"), ("exact", "full")])
def test_sync_sgd_float32_training_keeps_the_order_state_identical(mode, payload):
    comm = runtime.world()
    n, rank = comm.size, comm.rank
    rng = np.random.default_rng(100 + rank)
    m, batch = 10, 3
    x = torch.from_numpy(rng.normal(size=(m, 7)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, size=m))
    model = build_model("logreg", (7,), 3, seed=0)
    driver = FlatSync(model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
                      torch.nn.functional.cross_entropy, GradientExchange(transport()))
    sorter = make_sorter("dgrab", m, seed=1, rank=rank, world_size=n, mode=mode, payload=payload)
    digests, orders = [], []
    for _ in range(2):
        order = sorter.epoch_order()
        for lo in range(0, m - m % batch, batch):
            idx = order[lo:lo + batch]
            driver.step(x[idx], y[idx], sorter=sorter, indices=idx)
            digests.append(_digest(sorter.running_sum))
        dtype = sorter.running_sum.dtype
        sorter.end_epoch()
        orders.append(sorter.epoch_order().copy())
        if mode == "exact":
            digests.append(_digest(np.concatenate(sorter.last_epoch_signs)))
    all_digests = comm.allgather(digests)
    assert comm.allgather(sorter.diverged_steps) == [0] * n
    d = 7 * 3 + 3
    assert all(dg == all_digests[0] for dg in all_digests)
    assert dtype == (np.float32 if mode == "parallel" else np.float64)  # parallel: the gradient's dtype
    for o in orders:
        assert sorted(o.tolist()) == list(range(m))
    if payload == "half":   # 3 steps per epoch: blocks of 12, 12, 12 floats (+ the digest)
        assert driver.order_bytes == 2 * 3 * (d // 2 + 1) * 4
    elif mode == "parallel":
        assert driver.order_bytes == 2 * 3 * (d + 1) * 4  # 3 steps per epoch, d float32 each
