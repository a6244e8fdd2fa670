"""``benchmarks.virtual``: N workers in one process give the mean of the library's own SparseWorkers."""
import pytest
import torch

from benchmarks.virtual import LocalCommunicator, VirtualWorkers, density_label, worker_range
from hpc_dgrab.compress import SparseWorker, make_compressor

D = torch.float64


def test_worker_range_blocks():
    assert [list(worker_range(20, r, 3)) for r in range(3)] == [list(range(0, 6)), list(range(6, 13)),
                                                                 list(range(13, 20))]
    with pytest.raises(ValueError):
        worker_range(2, 0, 4)


def test_density_label():
    assert density_label(0.001) == "0.1%" and density_label(0.01) == "1%" and density_label(0.6) == "60%"


@pytest.mark.parametrize("method", ["topk", "regtopk"])
def test_virtual_workers_are_the_mean_of_sparse_workers(method):
    """Three rounds of 3 virtual workers = 3 SparseWorkers composed by hand (compress, sum, /N, observe)."""
    n, d = 3, 12
    g = torch.Generator().manual_seed(5)
    rounds = [[torch.randn(d, generator=g, dtype=D) for _ in range(n)] for _ in range(3)]
    ex = VirtualWorkers(method, d, n, LocalCommunicator(), local_workers=n, dtype=D, k=4, mu=4.0)
    ref = [SparseWorker(make_compressor(method, k=4, mu=4.0), d, dtype=D) for _ in range(n)]
    for grads in rounds:
        mean = ex.exchange_many(grads)
        total = torch.zeros(d, dtype=D)
        for w, gr in zip(ref, grads):
            idx, val = w.compress(gr)
            total.index_add_(0, idx, val)
        expected = total / n
        for w in ref:
            w.observe(expected, n)
        assert torch.equal(mean, expected)
        assert torch.count_nonzero(mean) <= n * 4
    assert ex.k == 4
    assert ex.bytes_sent == 3 * n * 4 * (4 + 8)     # int32 index + float64 value per entry


def test_dense_method_is_plain_mean_and_counts_the_buffer():
    ex = VirtualWorkers("none", 3, 2, LocalCommunicator(), local_workers=2, dtype=D)
    mean = ex.exchange_many([torch.tensor([1.0, 2, 3], dtype=D), torch.tensor([3.0, 2, 1], dtype=D)])
    assert torch.equal(mean, torch.tensor([2.0, 2, 2], dtype=D))
    assert ex.bytes_sent == 3 * 8 and ex.k == 3
    with pytest.raises(ValueError):
        ex.exchange_many([torch.zeros(3, dtype=D)])


def test_one_worker_exchange_keeps_the_shape():
    ex = VirtualWorkers("regtopk", 100, 1, LocalCommunicator(), density=0.1, mu=4.0)
    mean = ex.exchange(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)))
    assert mean.shape == (10, 10) and torch.count_nonzero(mean) <= 10
    assert ex.bytes_sent == 10 * (4 + 4)
