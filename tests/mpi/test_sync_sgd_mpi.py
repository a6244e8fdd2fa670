"""Synchronous SGD over MPI all-reduce equals one process on the union of the ranks' batches."""
import numpy as np
import pytest
import torch

from hpc_dgrab import runtime
from hpc_dgrab.comm import collectives
from hpc_dgrab.models import build_model
from hpc_dgrab.tensors import flat_params
from hpc_dgrab.optim.sync_sgd import DenseExchanger, SyncSGD

pytestmark = pytest.mark.mpi


def test_allreduce_exact_sum():
    comm = runtime.world()
    t = torch.arange(10, dtype=torch.float64) * (comm.rank + 1)
    collectives.allreduce_(t)
    n = comm.size
    expected = torch.arange(10, dtype=torch.float64) * (n * (n + 1) / 2)
    assert torch.equal(t, expected)


def _problem(n_total=96, d=5, classes=3):
    rng = np.random.default_rng(42)
    x = torch.from_numpy(rng.normal(size=(n_total, d)))
    y = torch.from_numpy(rng.integers(0, classes, size=n_total))
    return x, y


def _train(x_parts, y_parts, exchanger, steps, batch):
    torch.set_default_dtype(torch.float64)
    try:
        model = build_model("logreg", (x_parts.shape[-1],), 3, seed=7)
    finally:
        torch.set_default_dtype(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    driver = SyncSGD(model, opt, torch.nn.functional.cross_entropy, exchanger)
    for t in range(steps):
        driver.step(x_parts[t * batch:(t + 1) * batch], y_parts[t * batch:(t + 1) * batch])
    return flat_params(model)


def test_sync_sgd_equals_single_process_on_union():
    comm = runtime.world()
    n, batch, steps = comm.size, 4, 6
    x, y = _problem()
    # rank r owns rows r, r+n, r+2n, ... and visits them in that order
    mine = _train(x[comm.rank::n], y[comm.rank::n], DenseExchanger(collectives.allreduce_, n), steps, batch)
    # reference: one process, global batch t = the union of every rank's batch t
    xs = torch.stack([x[r::n] for r in range(n)])  # (n, m, d)
    ys = torch.stack([y[r::n] for r in range(n)])
    glob_x = torch.cat([xs[:, t * batch:(t + 1) * batch].reshape(-1, x.shape[1]) for t in range(steps)])
    glob_y = torch.cat([ys[:, t * batch:(t + 1) * batch].reshape(-1) for t in range(steps)])
    ref = _train(glob_x, glob_y, DenseExchanger(lambda t: t, 1), steps, batch * n)
    all_params = comm.allgather(mine.numpy())
    assert np.max(np.abs(mine.numpy() - ref.numpy())) < 1e-12
    for other in all_params:  # every rank holds bit-identical weights
        assert np.array_equal(other, all_params[0])
