#!/usr/bin/env bash
# tests/gpu/check.sh: run the public API's tests on CUDA (2 MPI ranks sharing one GPU).
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
echo "gpu: API tests and a D-GraB + RegTop-k training run passed on CUDA"
