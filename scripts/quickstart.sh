#!/usr/bin/env bash
# Set up .venv if needed, then train the embedded default: a small CNN on MNIST-5k with K-FAC.
# Extra arguments go to `kfac-dist train` (e.g. --optimizer sgd --epochs 3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/kfac-dist train "$@"
