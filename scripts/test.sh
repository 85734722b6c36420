#!/usr/bin/env bash
# The test command: set up the environment, lint (ruff), type-check (mypy; see pyproject.toml), run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check src tests examples benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
