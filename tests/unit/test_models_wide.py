"""``mlp-wide``: the communication-bound benchmark model (>= 5e6 parameters on 28x28 inputs)."""
import torch

from hpc_dgrab.models import build_model


def test_mlp_wide_has_five_million_parameters_and_runs():
    model = build_model("mlp-wide", (1, 28, 28), 10, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 784 * 6400 + 6400 + 6400 * 10 + 10 >= 5e6
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
