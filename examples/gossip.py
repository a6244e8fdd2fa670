"""Decentralized asynchronous SGD (DASGD) in your own loop: GossipOptimizer over push-sum gossip.

    python -m hpc_dgrab.data shard digits --out data/digits-2 --shards 2
    launch/local -n 2 -- python examples/gossip.py --data data/digits-2 --topology exponential

There is no all-reduce while training: after each local step a rank pushes a share of its model to
its neighbours and merges what has arrived, without waiting. Ranks may run different numbers of
steps. At the end ``finish()`` drains the messages and ``average_model()`` gives the network average.
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
    p.add_argument("--topology", default="exponential", help="ring, torus, hypercube, exponential, ...")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args()

    hd.init()
    train = ShardDataset(args.data, rank=hd.rank(), world_size=hd.size())
    val = ShardDataset(args.data, rank=hd.rank(), world_size=hd.size(), split="val")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(train.input_shape).prod()), 64), nn.Tanh(),
                          nn.Linear(64, train.num_classes))
    loss_fn = nn.functional.cross_entropy
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)  # any length on any rank
    opt = hd.GossipOptimizer(torch.optim.SGD(model.parameters(), lr=args.lr), model, topology=args.topology)
    for epoch in range(args.epochs):
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()                                     # local step, push, merge; never waits
        if hd.rank() == 0:
            print(f"epoch {epoch + 1}: staleness avg {opt.staleness_avg:.2f} max {opt.staleness_max}, "
                  f"sent {opt.bytes_sent / 2 ** 20:.2f} MiB", flush=True)
    stats = opt.finish()
    opt.average_model()
    with torch.no_grad():
        xv, yv = val.get_batch(torch.arange(len(val)).numpy())
        out = model(xv)
        s = hd.allreduce(torch.tensor([loss_fn(out, yv, reduction="sum").item(),
                                       (out.argmax(1) == yv).sum().item(), len(yv)], dtype=torch.float64),
                         op=hd.Sum)
    if hd.rank() == 0:
        print(f"network average: val loss {s[0] / s[2]:.4f}, val acc {s[1] / s[2]:.3f} "
              f"({stats['steps']} steps and {stats['merged']} merged messages on rank 0)", flush=True)


if __name__ == "__main__":
    main()
