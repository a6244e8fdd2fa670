#!/usr/bin/env bash
# tests/gpu/check.sh: run the public API's tests on CUDA (2 MPI ranks sharing one GPU), the NCCL
# transport and the DDP hooks.
# Where torch sees no CUDA device it prints "skip: <reason>" and exits 0.
# Usage: tests/gpu/check.sh [PYTHON]   (default: python3 on PATH)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
py="${1:-python3}"
cd "$root"
if ! reason=$("$py" - <<'PY' 2>&1
import sys
try:
    import torch
except Exception as exc:
    print(f"torch does not import ({exc})"); sys.exit(1)
if not torch.cuda.is_available():
    print(f"no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda})"); sys.exit(1)
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
); then
  echo "skip: $reason"
  exit 0
fi
echo "gpu: $reason"
"$py" -c "from mpi4py import MPI; print('mpi:', MPI.Get_library_version().splitlines()[0])"
# The tests pick the device themselves (cuda when available): models, data and gradient buckets
# live on the GPU; all-reduces go through pinned host staging, or straight from device memory
# when the MPI is CUDA-aware.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
"$root/launch/local" -n 2 -- "$py" -m pytest -q --only-mpi -p no:cacheprovider tests/mpi/test_api_mpi.py
"$py" -m pytest -q -p no:cacheprovider tests/unit/test_api.py
# D-GraB through the trainer on CUDA: its per-example products run on the host, the rest on the GPU
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$py" -c "from hpc_dgrab.data import ensure_shards; ensure_shards('digits', '$tmp/digits', shards=2, partition='iid', seed=0)"
"$root/launch/local" -n 2 -- "$py" -m hpc_dgrab.train --data "$tmp/digits" --model cnn --order dgrab \
  --compress regtopk --epochs 1 --batch-size 16 --metrics "$tmp/m.jsonl" --progress off
# The torch.distributed transport on NCCL and the DDP hooks on CUDA. NCCL refuses two ranks on one
# GPU, so these run as 1 rank under mpirun (the rendezvous from the MPI world, the collectives, the
# sparse all-gather packed on the device, the hooks' compressed path), then as 2 ranks over gloo
# with CUDA tensors when there is one GPU (NCCL with 2 ranks when there are two).
cat > "$tmp/nccl.py" <<'PY'
import torch
from torch import nn
import hpc_dgrab as hd
from hpc_dgrab.comm import choose_backend, get_transport
from hpc_dgrab.comm.sparse import sparse_allgather

hd.init(backend="torch")                 # NCCL when CUDA and NCCL are there
assert choose_backend() == "nccl" and choose_backend(None, "cuda") == "nccl", choose_backend()
n, r = hd.size(), hd.rank()
dev = torch.device("cuda", hd.local_rank() % torch.cuda.device_count())
torch.cuda.set_device(dev)
t = get_transport("nccl")
x = torch.full((1000,), float(r + 1), device=dev)
assert torch.equal(t.allreduce_(x).cpu(), torch.full((1000,), n * (n + 1) / 2))
host = torch.ones(5)                      # a host tensor goes through the GPU and back
assert t.allreduce_(host).device.type == "cpu" and torch.equal(host, torch.full((5,), float(n)))
idx = torch.tensor([r, 10 + r], device=dev)
g = sparse_allgather(idx, torch.ones(2, device=dev), numel=100, same_sizes=True, transport=t)
assert g.indices[0].device == dev and float(g.to_dense().sum()) == 2 * n
t.close()
for make, hook in [(lambda: hd.ddp.TopKState(density=0.1), hd.ddp.topk_hook),
                   (lambda: hd.ddp.RegTopKState(density=0.1), hd.ddp.regtopk_hook)]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4)).to(dev)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index])
    state = make()
    hd.ddp.register(ddp, state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator(device=dev).manual_seed(r)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(torch.randn(16, 32, device=dev, generator=gen)),
                                    torch.randint(0, 4, (16,), device=dev, generator=gen)).backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    from mpi4py import MPI
    assert len(set(MPI.COMM_WORLD.allgather(flat.numpy().tobytes()))) == 1, "ranks differ"
    assert state.iter == 5 and state.workers and flat.isfinite().all()
model = nn.Linear(32, 4).to(dev)
opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                              compression=hd.RegTopK(0.1))     # backend None: NCCL for CUDA parameters
opt.zero_grad(); model(torch.randn(8, 32, device=dev)).sum().backward(); opt.step()
print(f"gpu: rank {r}/{n}: NCCL transport, sparse all-gather on the device, DDP topk/regtopk hooks, "
      "DistributedOptimizer over NCCL: ok")
hd.shutdown()
PY
"$root/launch/local" -n 1 -- "$py" "$tmp/nccl.py"
if [ "$("$py" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  "$root/launch/local" -n 2 -- "$py" "$tmp/nccl.py"
fi
"$root/launch/local" -n 2 -- "$py" -m pytest -q --only-mpi -p no:cacheprovider tests/mpi/test_ddp_mpi.py
echo "gpu: API tests, a D-GraB + RegTop-k training run, the NCCL transport and the DDP hooks passed on CUDA"
