"""OrderedSampler (D-GraB) with torch DDP over gloo (hpc_dgrab.ddp_order): the same orders and
parameters as DistributedOptimizer(sampler=...) on the same model, data and initial weights.
mpirun -n 2 .. 4. Every rank computes, then every rank asserts (no assert before a collective)."""
import pytest
import torch
from torch import nn

N, BATCH, EPOCHS = 24, 4, 2


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _data(rank):
    gen = torch.Generator().manual_seed(50 + rank)
    return torch.randn(N, 5, generator=gen), torch.randint(0, 3, (N,), generator=gen)


def _run(use_ddp):
    """EPOCHS epochs of SGD with D-GraB's order; (final parameters, every epoch's order)."""
    import hpc_dgrab as hd
    from hpc_dgrab import ddp_order

    comm = _world()
    x_all, y_all = _data(comm.rank)
    model = _model()
    sampler = hd.OrderedSampler(N, order="dgrab", batch_size=BATCH, seed=3)
    if use_ddp:
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        channel = ddp_order.attach(sampler, ddp)
    else:
        opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                      sampler=sampler)
    orders = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        order = list(sampler)
        orders.append(order)
        for b in range(0, len(order), BATCH):
            idx = order[b:b + BATCH]
            opt.zero_grad()
            if use_ddp:
                ddp_order.backward(sampler, ddp, nn.functional.cross_entropy, x_all[idx], y_all[idx])
            else:
                sampler.backward(model, nn.functional.cross_entropy, x_all[idx], y_all[idx])
            opt.step()
    sent = channel.bytes_sent if use_ddp else sampler.payload_bytes
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), orders, sent


@pytest.mark.mpi(min_size=2)
def test_dgrab_with_ddp_equals_the_distributed_optimizer_run():
    import hpc_dgrab as hd

    comm = _world()
    hd.init(comm, backend="gloo")
    with_ddp, ddp_orders, ddp_bytes = _run(True)
    with_opt, opt_orders, opt_bytes = _run(False)
    hd.shutdown()
    hd.init(comm)
    gap = float((with_ddp - with_opt).abs().max())
    moved = float((with_ddp - torch.cat([p.detach().reshape(-1) for p in _model().parameters()])).abs().max())
    same_on_ranks = len(set(comm.allgather(with_ddp.numpy().tobytes()))) == 1
    ok = (gap <= 1e-6 and moved > 1e-3 and ddp_orders == opt_orders and ddp_orders[0] != ddp_orders[1]
          and ddp_bytes == opt_bytes > 0 and same_on_ranks)
    assert all(comm.allgather(ok)), (gap, moved, ddp_bytes, opt_bytes)


@pytest.mark.mpi(min_size=2)
def test_attach_refuses_a_model_that_is_not_ddp():
    import hpc_dgrab as hd
    from hpc_dgrab import ddp_order

    hd.init(_world())
    sampler = hd.OrderedSampler(N, order="dgrab", batch_size=BATCH)
    with pytest.raises(hd.UserError, match="expected a torch DistributedDataParallel model, got Linear"):
        ddp_order.attach(sampler, nn.Linear(2, 2))
