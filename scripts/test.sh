#!/usr/bin/env bash
# The test command: set up the environment, lint, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check src tests examples benchmarks
.venv/bin/python -m pytest -q "$@"
