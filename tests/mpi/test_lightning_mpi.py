"""Lightning's DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...) with hpc_dgrab's RegTop-k hook, on
CPU over gloo, the ranks started by mpirun (Lightning's MPIEnvironment). Lightning registers a
strategy's hook on CUDA only, so on CPU the module registers it in ``on_train_start`` (as
docs/guides/ddp.md says). Checked: the hook ran (compressed steps counted, memory kept) and the
ranks' parameters are bit-identical and equal a plain DDP run with the same hook to 1e-6.
Skipped where ``lightning`` does not import. Slow (Lightning's start-up)."""
import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning")

STEPS, BATCH = 6, 8


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))


def _data(rank):
    gen = torch.Generator().manual_seed(70 + rank)
    return torch.randn(STEPS * BATCH, 6, generator=gen), torch.randint(0, 3, (STEPS * BATCH,), generator=gen)


class _Module(lightning.LightningModule):
    def __init__(self, state, hook):
        super().__init__()
        self.net = _net()
        self.state, self.hook = state, hook

    def on_train_start(self):
        self.trainer.strategy.model.register_comm_hook(self.state, self.hook)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _plain_ddp(hook_state, hook, x, y):
    model = _net()
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(hook_state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(STEPS):
        opt.zero_grad()
        part = slice(s * BATCH, (s + 1) * BATCH)
        nn.functional.cross_entropy(ddp(x[part]), y[part]).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.mpi(min_size=2)
def test_lightning_ddp_strategy_with_the_regtopk_hook():
    from lightning.pytorch.strategies import DDPStrategy

    import hpc_dgrab as hd

    comm = _world()
    x, y = _data(comm.rank)
    state = hd.ddp.RegTopKState(density=0.2)
    module = _Module(state, hd.ddp.regtopk_hook)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = lightning.Trainer(
        accelerator="cpu", devices=comm.size, num_nodes=1, max_steps=STEPS,
        strategy=DDPStrategy(process_group_backend="gloo", ddp_comm_state=state,
                             ddp_comm_hook=hd.ddp.regtopk_hook),
        use_distributed_sampler=False,            # each rank trains on its own data, as in _plain_ddp
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    got = torch.cat([p.detach().reshape(-1) for p in module.net.parameters()])
    want = _plain_ddp(hd.ddp.RegTopKState(density=0.2), hd.ddp.regtopk_hook, x, y)
    gap = float((got - want).abs().max())
    same = len(set(comm.allgather(got.numpy().tobytes()))) == 1
    del trainer, module
    import torch.distributed as dist

    if dist.is_initialized():             # Lightning leaves its default group: the later tests need none
        dist.barrier()
        dist.destroy_process_group()
    ok = state.iter == STEPS and bool(state.workers) and same and gap <= 1e-6
    assert all(comm.allgather(ok)), (state.iter, gap, same)
