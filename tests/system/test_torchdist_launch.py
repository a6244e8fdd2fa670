"""The torch.distributed transport without MPI: its default group from torchrun's variables (two
processes under ``torch.distributed.run --standalone``), or a single process with no launcher at all;
and under MPI, transports left open at exit end without a hang (pytorch#56297). Serial lane (each
test starts processes)."""
import pytest

from hpc_dgrab.runtime import launched_by_mpi
from tests.helpers import child_env, run_cmd

SCRIPT = """
import sys
import torch
import torch.distributed as dist
from hpc_dgrab.comm.torchdist import TorchTransport

t = TorchTransport(backend="gloo")
x = torch.full((3,), float(t.rank + 1))
t.allreduce_(x)
g, counts = t.allgatherv(torch.arange(t.rank + 1.0))
t.close()
line = " ".join(map(str, ("result", t.rank, t.size, x.tolist(), g.tolist(), counts, dist.is_initialized())))
with open(f"{sys.argv[1]}/result-{t.rank}", "w") as fh:   # one file a rank: the ranks' stdout interleaves
    fh.write(line)
"""


def _results(proc, out):
    assert proc.returncode == 0, proc.stderr
    return sorted(p.read_text().split(" ", 2)[1:] for p in out.glob("result-*"))


@pytest.mark.skipif(launched_by_mpi(), reason="serial-only: starts processes")
def test_group_from_torchrun_variables(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    proc = run_cmd(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                    str(tmp_path)],
                   timeout=120, env=child_env(OMP_NUM_THREADS="1"))
    rest = "[3.0, 3.0, 3.0] [0.0, 0.0, 1.0] [1, 2] False"
    assert _results(proc, tmp_path) == [["0", f"2 {rest}"], ["1", f"2 {rest}"]], proc.stdout


@pytest.mark.skipif(launched_by_mpi(), reason="serial-only: starts processes")
def test_a_single_process_without_a_launcher(tmp_path):
    script = tmp_path / "alone.py"
    script.write_text(SCRIPT)
    env = child_env()
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = run_cmd([str(script), str(tmp_path)], timeout=60, env=env)
    assert _results(proc, tmp_path) == [["0", "1 [1.0, 1.0, 1.0] [0.0] [1] False"]], proc.stdout


LEFT_OPEN = """
import sys
import torch
from mpi4py import MPI
from torch import nn

import hpc_dgrab as hd
from hpc_dgrab.comm import get_transport

hd.init(MPI.COMM_WORLD)
model = nn.Linear(4, 2)
opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                              backend="gloo")
model(torch.randn(3, 4)).sum().backward()
opt.step()
t = get_transport("gloo")
h = t.allreduce_async_(torch.ones(1000))    # never waited
with open(f"{sys.argv[1]}/bye-{MPI.COMM_WORLD.rank}", "w") as fh:   # one file a rank: stdout interleaves
    fh.write("bye")
"""


@pytest.mark.skipif(launched_by_mpi(), reason="serial-only: starts processes")
def test_transports_left_open_at_exit_end_without_a_hang(tmp_path):
    script = tmp_path / "left_open.py"
    script.write_text(LEFT_OPEN)
    proc = run_cmd([str(script), str(tmp_path)], ranks=2, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("bye-*")) == ["bye-0", "bye-1"], proc.stdout
