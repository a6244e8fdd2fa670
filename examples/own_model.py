"""Your own CNN and Dataset, trained data-parallel with hpc_dgrab's DistributedOptimizer + RegTop-k.

    python -m hpc_dgrab.data shard fashion-mnist --out data/fmnist-2 --shards 2
    launch/local -n 2 -- python examples/own_model.py --data data/fmnist-2 --epochs 2

Every rank reads ONE HDF5 shard file (``shard-<rank>.h5``: datasets ``x`` and ``y``) through a plain
torch Dataset opened with h5py; nothing else of the library is needed for the data.
"""
import argparse
import os

import h5py
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import hpc_dgrab as hd


class H5Shard(Dataset):
    """One shard file, read into memory (uint8 images are scaled to [0, 1])."""

    def __init__(self, path: str) -> None:
        with h5py.File(path, "r") as f:
            x = torch.from_numpy(f["x"][...])
            self.y = torch.from_numpy(f["y"][...]).long()
        self.x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if self.x.dim() == 3:
            self.x = self.x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class CNN(nn.Module):
    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a shard directory (python -m hpc_dgrab.data shard ...)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--density", type=float, default=0.05, help="RegTop-k: fraction of entries sent")
    args = p.parse_args()

    hd.init()
    torch.manual_seed(hd.rank())                      # different inits on purpose: the broadcast fixes it
    data = H5Shard(os.path.join(args.data, f"shard-{hd.rank():05d}.h5"))
    sampler = hd.OrderedSampler(len(data), order="rr", seed=0, batch_size=args.batch_size)  # same steps
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)
    model = CNN(data.x.shape[1], int(data.y.max()) + 1)
    hd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    opt = hd.DistributedOptimizer(opt, model.named_parameters(), compression=hd.RegTopK(density=args.density))
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2)
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mean = opt.add_payload(torch.stack([loss.detach(), torch.tensor(1.0)]))  # rides with the gradient
            opt.step()
            total += mean.value
        if hd.rank() == 0:
            print(f"epoch {epoch + 1}: train loss {total[0] / total[1]:.4f}, "
                  f"sent {opt.bytes_sent / 2 ** 20:.2f} MiB", flush=True)


if __name__ == "__main__":
    main()
