"""D-GraB example ordering in your own loop: OrderedSampler + DistributedOptimizer.

    python -m hpc_dgrab.data shard digits --out data/digits-2 --shards 2
    launch/local -n 2 -- python examples/dgrab_sampler.py --data data/digits-2 --order dgrab

Compared with a plain data-parallel loop, D-GraB adds the sampler, hands it to the optimizer and
replaces ``loss.backward()`` by ``sampler.backward(...)`` (which computes per-example gradients with
torch.func, learns the next epoch's order from them, and sends its order data inside the gradient
all-reduce). ``--order rr`` is the baseline (random reshuffling) with the same loop.
"""
import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

import hpc_dgrab as hd
from hpc_dgrab.data import ShardDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a shard directory (python -m hpc_dgrab.data shard ...)")
    p.add_argument("--order", default="dgrab", choices=["rr", "grab", "pairbalance", "dgrab"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args()

    hd.init()
    train = ShardDataset(args.data, rank=hd.rank(), world_size=hd.size())
    val = ShardDataset(args.data, rank=hd.rank(), world_size=hd.size(), split="val")
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(train.input_shape).prod()), 64), nn.Tanh(),
                          nn.Linear(64, train.num_classes))
    hd.broadcast_parameters(model.state_dict(), root_rank=0)
    loss_fn = nn.functional.cross_entropy

    sampler = hd.OrderedSampler(len(train), order=args.order, seed=0, batch_size=args.batch_size)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    opt = hd.DistributedOptimizer(opt, model.named_parameters(), sampler=sampler)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            sampler.backward(model, loss_fn, x, y)        # instead of loss_fn(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            xv, yv = val.get_batch(torch.arange(len(val)).numpy())
            out = model(xv)
            stats = torch.tensor([loss_fn(out, yv, reduction="sum").item(),
                                  (out.argmax(1) == yv).sum().item(), len(yv)], dtype=torch.float64)
        s = hd.allreduce(stats, op=hd.Sum)                          # every rank evaluated its slice of val.h5
        if hd.rank() == 0:
            print(f"epoch {epoch + 1} ({args.order}): val loss {s[0] / s[2]:.4f}, val acc {s[1] / s[2]:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
