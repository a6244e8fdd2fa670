"""A user's own script under ``launch/local -n 2``: more backward passes than
``backward_passes_per_step``, and settings or payload sizes that differ across ranks, end with the
same one-line error and exit 2 on EVERY rank (each rank writes its exit code and line to a file),
well within the timeout; the right use exits 0 everywhere."""
import pytest

from tests.helpers import run_cmd

SCRIPT = r'''
import sys
import torch
from torch import nn
import hpc_dgrab as hd
from hpc_dgrab.errors import UserError

case, out = sys.argv[1], sys.argv[2]
hd.init()
r = hd.rank()
line, code = "ok", 0
try:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    kw = {}
    if case == "compression" and r == 1:
        kw = {"compression": hd.TopK(0.1)}
    if case == "bucket_cap_mb" and r == 1:
        kw = {"bucket_cap_mb": 1e-4}
    if case in ("passes_ok", "passes") and r == 1:
        kw = {"backward_passes_per_step": 2}
    if case == "passes_ok":
        kw = {"backward_passes_per_step": 2}
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), **kw)
    for step in range(3):
        opt.zero_grad()
        passes = 2 if case == "passes_ok" or (case == "extra_backward" and r == 1 and step == 1) else 1
        for _ in range(passes):
            model(torch.ones(3, 4)).sum().backward()
        if case == "payload":
            opt.add_payload(torch.ones(3 if r == 1 and step == 1 else 2))
        opt.step()
except UserError as exc:
    line, code = f"error: {exc}", 2
print(f"rank {r}: {line}", file=sys.stderr)
with open(f"{out}/rank{r}", "w") as f:
    f.write(f"{code}\n{line}\n")
hd.shutdown()
sys.exit(code)
'''


@pytest.mark.parametrize("case, fragment", [
    ("extra_backward", "more than backward_passes_per_step=1 backward passes before step() on 1 of 2"),
    ("compression", "compression (rank 0 has None, rank 1 has TopK(density=0.1)) differs across ranks"),
    ("bucket_cap_mb", "the bucket plan"),
    ("passes", "backward_passes_per_step (rank 0 has 1, rank 1 has 2) differs across ranks"),
    ("payload", "payload sizes (rank 0 has [2], rank 1 has [3]) differ across ranks"),
    ("passes_ok", None),
])
def test_every_rank_ends_with_the_same_line(tmp_path, case, fragment):
    script = tmp_path / "user.py"
    script.write_text(SCRIPT)
    proc = run_cmd([str(script), case, str(tmp_path)], ranks=2, timeout=90)
    results = [(tmp_path / f"rank{r}").read_text().splitlines() for r in range(2)]
    codes = [int(res[0]) for res in results]
    if fragment is None:
        assert proc.returncode == 0 and codes == [0, 0], proc.stderr
        return
    assert codes == [2, 2] and proc.returncode != 0, proc.stderr
    assert results[0][1] == results[1][1], results        # the same one line on every rank
    assert results[0][1].startswith("error: ") and fragment in results[0][1], results[0][1]
    assert "Traceback" not in proc.stderr, proc.stderr
