#!/usr/bin/env bash
# Set up .venv's test layer if needed (scripts/setup.sh test: Slurm, MPI, Horovod, test tools), lint, then run the
# test suite. Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/mypy kfac_dist launch
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q "$@"
