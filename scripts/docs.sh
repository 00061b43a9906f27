#!/usr/bin/env bash
# Build the documentation site into OUTDIR (default: docs/_build/html), with no network:
# Sphinx with warnings as errors and every cross-reference checked, the notebooks executed,
# then the examples of the docstrings and pages run (sphinx-build -b doctest).
# Needs the `docs` extra (part of `dev`): pip install -e ".[docs]".
# Usage: bash scripts/docs.sh [OUTDIR]        then open OUTDIR/index.html in a browser
set -euo pipefail
out="$(realpath -m "${1:-$(dirname "$0")/../docs/_build/html}")"
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || [ ! -x .venv/bin/python ]; then
    python="${PYTHON:-python3}"
else
    python=.venv/bin/python
fi
doctrees="$(mktemp -d)"
trap 'rm -rf "$doctrees"' EXIT
# -E: read every page afresh, so that the notebooks and the verify run are those of this code
"$python" -m sphinx -b html -j auto -E -W --keep-going -n -q -d "$doctrees" docs "$out"
"$python" -m sphinx -b doctest -W --keep-going -n -q -d "$doctrees" docs "$doctrees/doctest"
echo "documentation built in $out (open $out/index.html)"
