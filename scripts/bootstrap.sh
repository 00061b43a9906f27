#!/usr/bin/env bash
# Create ./.venv (if missing) and install PyTorch, then psi-geoopt, into it.
# Usage: bash scripts/bootstrap.sh [EXTRAS]     default `cli` (the command line's dependencies);
#        `bash scripts/bootstrap.sh dev` for the tests, lint, docs and notebooks as well
#
# Which PyTorch build: torch==2.13.0 is installed first, pinned, so that the package's open
# range (torch>=2.4) cannot pull another build later. By default pip takes it from its
# configured index (PyPI unless configured otherwise): on Linux x86_64 that is the CUDA
# build, which brings about twenty NVIDIA/CUDA packages (gigabytes); on macOS and Windows
# the CPU build. To choose, set
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu    the CPU build (no NVIDIA packages)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130  a given CUDA build
#   TORCH_SPEC=...                                           another requirement or a wheel file
# e.g. `TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/bootstrap.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cli}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
torch_index="${TORCH_INDEX_URL:-}"
# setuptools prints an "Editable installation ... be careful with folders in your working
# directory" notice for every editable install it serves through an import hook, which it
# does for every project whose packages are not all under one src/ folder (here psi_geoopt/
# and theory/, installed as psi_geoopt.theory). It is informational; hide it.
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -n "$torch_index" ]; then
    echo "installing $torch_spec from $torch_index"
    .venv/bin/python -m pip install --quiet --index-url "$torch_index" "$torch_spec"
else
    echo "installing $torch_spec from pip's configured index (on Linux x86_64 from PyPI: the" \
        "CUDA build; set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU build)"
    .venv/bin/python -m pip install --quiet "$torch_spec"
fi
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
echo "psi-geoopt installed in $(pwd)/.venv"
