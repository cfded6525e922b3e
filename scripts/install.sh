#!/usr/bin/env bash
# Install cloakbench (editable) into the active Python environment.
#
#   bash scripts/install.sh           # the package: enough for `cloakbench run quick`
#   bash scripts/install.sh --test    # plus pytest, pytest-benchmark, ruff, mypy and torchattacks
#
# PyTorch: if torch is already importable it is kept as it is (GPU users keep their CUDA build). If not,
# a machine with an NVIDIA GPU lets pip pick torch as usual (a CUDA build), and a machine without one
# gets the CPU build: torch==2.13.0, which these project machines serve from local disk in seconds. Set
# TORCH_INDEX_URL (for example https://download.pytorch.org/whl/cpu) to take torch from another index.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-python}
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3

extras=""
case "${1:-}" in
  "") ;;
  --test) extras="[test]" ;;
  *) echo "usage: bash scripts/install.sh [--test]" >&2; exit 2 ;;
esac

if "$python_bin" -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: keeping the installed torch $("$python_bin" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install.sh: NVIDIA GPU found; pip will choose a CUDA build of torch"
else
  echo "install.sh: no NVIDIA GPU; installing the CPU build of torch"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$python_bin" -m pip install --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
  else
    "$python_bin" -m pip install "torch==2.13.0"
  fi
fi

"$python_bin" -m pip install -e ".${extras}"
if [ "$extras" = "[test]" ]; then
  # torchattacks (the reference PGD of the parity test and the speed benchmark) imports only torch, numpy,
  # scipy and tqdm, but declares torchvision and requests~=2.25: resolving those would replace the CPU
  # torch with a CUDA build and downgrade requests. --no-deps installs just the package.
  "$python_bin" -m pip install --no-deps "torchattacks==3.5.1"
fi
