#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch + MPI + Gloo, CPU ops over MPI) into $VENV (default .venv).
#
# The released 0.28.1 sdist needs two changes to build against torch >= 2.1 and CMake >= 4:
#   1. torch >= 2.1 needs C++17, but Horovod hard-codes `set(CMAKE_CXX_STANDARD 14)` in both
#      CMakeLists.txt and horovod/torch/CMakeLists.txt (CXXFLAGS cannot override it; changing only the
#      torch one fails at link time) -> both are patched to 17 here.
#   2. CMake >= 4 refuses the bundled gloo's cmake_minimum_required -> use the system cmake
#      (HOROVOD_CMAKE=/usr/bin/cmake) when present, and CMAKE_POLICY_VERSION_MINIMUM=3.5 in any case.
# The wheel is built with --no-build-isolation so that it compiles against the installed torch.
# Does nothing when `import horovod.torch` already works in the venv. Prints every step it takes.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
VERSION=${HOROVOD_VERSION:-0.28.1}
JOBS=${JOBS:-2}

say() { echo "[horovod] $*"; }

if [ ! -x "$PY" ]; then
  echo "error: $PY not found; run 'make setup' first (or set VENV=...)" >&2
  exit 1
fi
if "$PY" -c "import horovod.torch" 2>/dev/null; then
  say "horovod.torch already importable in $VENV ($("$PY" -c 'import horovod; print(horovod.__version__)')); nothing to do"
  exit 0
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "error: torch is not importable in $VENV; run 'make setup' first" >&2
  exit 1
fi
command -v mpicxx >/dev/null || { echo "error: mpicxx not found (apt-get install libopenmpi-dev)" >&2; exit 1; }
command -v g++ >/dev/null || { echo "error: g++ not found (apt-get install g++)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
say "working in $work"

say "downloading the horovod==$VERSION sdist"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
  "horovod==$VERSION" -d "$work/dl"
sdist=$(ls "$work"/dl/horovod-"$VERSION".tar.gz)
say "unpacking $(basename "$sdist")"
tar -xzf "$sdist" -C "$work"
src="$work/horovod-$VERSION"

for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
  say "patching CMAKE_CXX_STANDARD 14 -> 17 in ${f#"$src"/}"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
  grep -q 'set(CMAKE_CXX_STANDARD 17)' "$f" || { echo "error: patch did not apply to $f" >&2; exit 1; }
done

# Prefer a cmake < 4 (Debian's); CMAKE_POLICY_VERSION_MINIMUM lets cmake >= 4 accept gloo as well.
if [ -x /usr/bin/cmake ]; then
  export HOROVOD_CMAKE=${HOROVOD_CMAKE:-/usr/bin/cmake}
  say "using cmake $HOROVOD_CMAKE ($("$HOROVOD_CMAKE" --version | head -1))"
fi
export CMAKE_POLICY_VERSION_MINIMUM=3.5
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_CPU_OPERATIONS=MPI
export MAKEFLAGS=-j$JOBS
say "building the wheel (HOROVOD_WITH_PYTORCH=1 WITH_MPI=1 WITH_GLOO=1 CPU_OPERATIONS=MPI, -j$JOBS; ~5 min on 2 cores)"
start=$(date +%s)
LOG="$VENV/horovod-build.log"
if ! "$PY" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
    -w "$work/wheel" "$src" >"$LOG" 2>&1; then
  tail -n 60 "$LOG" >&2
  echo "error: building horovod $VERSION failed (full log: $LOG)" >&2
  exit 1
fi
say "built $(ls "$work"/wheel/*.whl | xargs -n1 basename) in $(( $(date +%s) - start )) s"

say "installing into $VENV"
"$PY" -m pip install -q --disable-pip-version-check --no-deps "$work"/wheel/horovod-*.whl
# Horovod's declared runtime dependencies (cloudpickle, psutil, pyyaml, packaging, cffi) - only the missing ones.
"$PY" -m pip install -q --disable-pip-version-check cloudpickle psutil pyyaml packaging cffi

"$PY" -c "import horovod.torch as hvd; print('[horovod] import ok:', hvd.__name__, 'mpi built:', hvd.mpi_built(), 'gloo built:', hvd.gloo_built())"
