"""Validation loss and accuracy: :func:`evaluate_local` on this rank's data (no communication),
:func:`evaluate` over every rank's slice (one all-reduce of three numbers)."""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Dict, Sequence, Union

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from mpi4py import MPI

    from hpc_dgrab.data import ShardDataset

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Totals:
    """Sums over a validation set: loss sum, correct predictions, examples."""

    loss_sum: float
    correct: float
    count: float

    @classmethod
    def of(cls, values: Union[Sequence[float], np.ndarray]) -> Totals:
        return cls(float(values[0]), float(values[1]), float(values[2]))

    def as_list(self) -> list:
        return [self.loss_sum, self.correct, self.count]

    def metrics(self) -> Dict[str, float]:
        """``val_loss`` (mean) and ``val_acc`` (fraction correct)."""
        n = max(self.count, 1)
        return {"val_loss": self.loss_sum / n, "val_acc": self.correct / n}


@torch.no_grad()
def evaluate_local(model: nn.Module, data: ShardDataset, batch_size: int, device: str) -> Totals:
    """Totals of ``model`` on this rank's ``data`` only — no communication."""
    model.eval()
    totals = np.zeros(3)
    step = max(batch_size, 256)
    for lo in range(0, len(data), step):
        x, y = data.get_batch(np.arange(lo, min(lo + step, len(data))))
        out = model(x.to(device))
        y = y.to(device)
        totals += (nn.functional.cross_entropy(out, y, reduction="sum").item(),
                   (out.argmax(1) == y).sum().item(), len(y))
    return Totals.of(totals)


def evaluate(model: nn.Module, data: ShardDataset, batch_size: int, device: str,
             comm: MPI.Comm) -> Dict[str, float]:
    """Loss and accuracy over every rank's validation slice (one all-reduce of three numbers)."""
    totals = np.array(evaluate_local(model, data, batch_size, device).as_list())
    comm.Allreduce(totals.copy(), totals)
    return Totals.of(totals).metrics()
