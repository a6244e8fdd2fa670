#!/usr/bin/env bash
# Idempotent set-up for a Debian 12 machine (root, or a user with sudo): Debian packages,
# a .venv with the pinned CPU torch when no torch is present, and this package with its extras.
# Prints each step it takes; skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # the CPU build; a cluster installs its own CUDA torch first
APT_PACKAGES=(openmpi-bin libopenmpi-dev dataset-fashion-mnist iproute2)   # iproute2: launch/netem

say() { echo "[setup] $*"; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "error: missing Debian packages ${missing[*]} and not root: apt-get install ${missing[*]}" >&2; exit 1
  fi
  say "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
else
  say "Debian packages present: ${APT_PACKAGES[*]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
fi
LOG="$VENV/setup.log"
pip_install() {  # quiet pip; its full output goes to $LOG and is shown only on failure
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >>"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    echo "error: pip install $* failed (full log: $LOG)" >&2
    exit 1
  fi
}

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  say "torch present: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
else
  say "pip install $TORCH_SPEC"
  pip_install "$TORCH_SPEC"
fi

stamp="$VENV/.hpc_dgrab-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -e "$stamp" ] && "$VENV/bin/python" -c "import hpc_dgrab, mpi4py, h5py, pytest_mpi" 2>/dev/null; then
  say "hpc_dgrab installed (editable) with [test] extras"
else
  say "pip install -e .[test]"
  pip_install -e ".[test]"
  rm -f "$VENV"/.hpc_dgrab-*
  touch "$stamp"
fi
