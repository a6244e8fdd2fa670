"""DistributedOptimizer resumes from a state_dict written before the refactor of issue 18.

``tests/data/distopt_regtopk_before_refactor.pt`` was written by the code of before (one process, RegTop-k
at density 0.3): the model and optimizer state after 3 steps, the data, and the parameters after 2
more steps. Loading that state here must continue bit for bit as the old code did."""
import os

import torch
from torch import nn

import hpc_dgrab as hd
from hpc_dgrab.optim.agreement import N_FLAGS
from tests.helpers import DATA_DIR


def test_old_compressed_state_resumes_bit_for_bit():
    hd.init()
    old = torch.load(os.path.join(DATA_DIR, "distopt_regtopk_before_refactor.pt"))
    assert set(old["optimizer"]["hpc_dgrab"]["compression"]) == {"method", "num_workers", "bytes_sent",
                                                                 "rounds", "workers"}
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    model.load_state_dict(old["model"])
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  model.named_parameters(), compression=hd.RegTopK(density=0.3, mu=4.0))
    opt.load_state_dict(old["optimizer"])
    for t in range(3, 5):
        opt.zero_grad()
        nn.functional.mse_loss(model(old["x"][t]), old["y"][t]).backward()
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, old["final"][k]), k
    # the two steps here also carried the step's flags (added since: N_FLAGS float64 each)
    assert opt.bytes_sent == old["bytes_sent"] + 2 * N_FLAGS * 8
    again = opt.state_dict()["hpc_dgrab"]
    assert again["steps"] == 5 and again["compression"]["rounds"] == 5
    assert again["compression"]["method"] == "regtopk" and len(again["compression"]["workers"]) == 1
