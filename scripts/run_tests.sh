#!/usr/bin/env bash
# Set up .venv if needed, lint, then run the test suite. Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy kfac_dist launch
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q "$@"
