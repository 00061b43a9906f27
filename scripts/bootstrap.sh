#!/usr/bin/env bash
# Create ./.venv (if missing) and install psi-geoopt into it, CPU build of PyTorch first.
# Usage: bash scripts/bootstrap.sh [EXTRAS]     default `cli` (the command line's dependencies);
#        `bash scripts/bootstrap.sh dev` for the tests, lint and notebooks as well
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cli}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch first: an open range would otherwise pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
echo "psi-geoopt installed in $(pwd)/.venv"
