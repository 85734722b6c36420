#!/usr/bin/env bash
# Create (or reuse) ./.venv and install metaprox with the CPU build of PyTorch. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Pin torch first: an unpinned requirement can pull a multi-GB CUDA build. 2.13.0 is the CPU wheel this project
# is tested with; set METAPROX_TORCH to use another (e.g. "torch==2.6.0").
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${METAPROX_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,yaml,parquet,tune]"  # parquet, tune: their tests run in CI
