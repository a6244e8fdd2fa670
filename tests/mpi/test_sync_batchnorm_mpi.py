"""hd.SyncBatchNorm on 2-4 ranks (batches of different sizes) against one BatchNorm over the
concatenated batch: outputs, input gradients, summed weight/bias gradients, running statistics."""
import pytest
import torch
from torch import nn

import hpc_dgrab as hd
from hpc_dgrab import runtime

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("shape, momentum", [((3, 4, 5), 0.1), ((3, 4, 2, 3), None), ((3, 4), 0.3)])
def test_matches_one_batchnorm_over_the_concatenated_batch(shape, momentum):
    comm = runtime.world()
    if comm.size < 2:
        pytest.skip("needs 2 ranks")
    hd.init(comm)
    g = torch.Generator().manual_seed(7)
    sizes = [shape[0] + r for r in range(comm.size)]          # a different batch size on every rank
    xs = [5.0 + 3.0 * torch.randn((n,) + shape[1:], generator=g, dtype=torch.float64) for n in sizes]
    ws = [torch.randn((n,) + shape[1:], generator=g, dtype=torch.float64) for n in sizes]
    c = shape[1]
    sync = hd.SyncBatchNorm(c, momentum=momentum).double()
    ref = nn.BatchNorm1d(c, momentum=momentum).double() if len(shape) < 5 else None
    ref = nn.BatchNorm2d(c, momentum=momentum).double() if len(shape) == 4 else ref
    with torch.no_grad():
        for m in (sync, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-1, 1, c))
    for _ in range(2):   # two steps: the running statistics accumulate
        x = xs[comm.rank].clone().requires_grad_(True)
        out = sync(x)
        (out * ws[comm.rank]).sum().backward()
        xall = torch.cat(xs).requires_grad_(True)
        ref.zero_grad()
        rout = ref(xall)
        (rout * torch.cat(ws)).sum().backward()
        lo = sum(sizes[:comm.rank])
        assert torch.max(torch.abs(out - rout[lo:lo + sizes[comm.rank]])).item() < 1e-5
        assert torch.max(torch.abs(x.grad - xall.grad[lo:lo + sizes[comm.rank]])).item() < 1e-5
        for name in ("weight", "bias"):
            total = torch.from_numpy(comm.allreduce(getattr(sync, name).grad.numpy()))
            assert torch.max(torch.abs(total - getattr(ref, name).grad)).item() < 1e-5
            getattr(sync, name).grad = None
    assert torch.allclose(sync.running_mean, ref.running_mean, atol=1e-10)
    assert torch.allclose(sync.running_var, ref.running_var, atol=1e-10)
    assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    sync.eval()
    ref.eval()
    assert torch.allclose(sync(xs[0]), ref(xs[0]), atol=1e-10)
