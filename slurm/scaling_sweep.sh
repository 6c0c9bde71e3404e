#!/usr/bin/env bash
# Scaling sweep: submit the same run at several node counts, one independent job each (no dependencies between
# them, so they run whenever the scheduler finds the nodes), then summarise what they measured.
#
#   slurm/scaling_sweep.sh [sbatch options ...] [-- key.path=value ...]     # submit
#   slurm/scaling_sweep.sh --summary                                        # table from the finished runs
#
# Examples (from the repository root):
#   DATA_ROOT=/datasets/imagenet slurm/scaling_sweep.sh -A myacct -p gpu
#   NODE_COUNTS="1 2 4 8 16" CONFIG=configs/imagenet_resnet50_sgd.yaml slurm/scaling_sweep.sh -- training.amp=bf16
#   DRY_RUN=1 slurm/scaling_sweep.sh                      # print the sbatch commands, submit nothing
#
# Every job runs TEMPLATE with --nodes=N and RUN_DIR=$SWEEP_DIR/nodes-N (metrics.csv, checkpoints), one epoch and
# no resume by default (SWEEP_OVERRIDES), so every point starts from the same initialisation; the per-GPU batch
# stays fixed (weak scaling) and the lr scales with the world size as the config says. The summary reads each
# run's metrics.csv: epoch time, time per step, K-FAC's share of it, and images per second.
#
# Environment:
#   NODE_COUNTS      node counts to submit                    (default: "1 2 4 8")
#   TEMPLATE         the sbatch template                      (default: slurm/multi_node.sbatch)
#   CONFIG           the run config                           (default: configs/imagenet_resnet50.yaml)
#   SWEEP_DIR        parent of the run directories            (default: runs/scaling/<config name>)
#   SWEEP_OVERRIDES  overrides put before the ones after --   (default: "training.epochs=1 checkpoint.resume=none")
#   DRY_RUN=1        print the commands instead of submitting
#   plus everything the template reads (DATA_ROOT, KFAC_DIST, NCCL_*, ...; slurm/README.md).
# sbatch options (before --) go to every job and override the template's #SBATCH lines, e.g. -A, -p, --time,
# --gpus-per-task, or --wait (submit one after another and wait for each; the script then exits non-zero if any
# job failed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NODE_COUNTS="${NODE_COUNTS:-1 2 4 8}"
TEMPLATE="${TEMPLATE:-slurm/multi_node.sbatch}"
CONFIG="${CONFIG:-configs/imagenet_resnet50.yaml}"
SWEEP_DIR="${SWEEP_DIR:-runs/scaling/$(basename "$CONFIG" .yaml)}"
read -r -a defaults <<< "${SWEEP_OVERRIDES-training.epochs=1 checkpoint.resume=none}"

summary() {
    local python="python3"
    if [ -x "$ROOT/.venv/bin/python" ]; then python="$ROOT/.venv/bin/python"; fi
    "$python" - "$SWEEP_DIR" <<'PYEOF'
import csv
import sys
from pathlib import Path

sweep = Path(sys.argv[1])
runs = sorted(sweep.glob("nodes-*/metrics.csv"), key=lambda p: int(p.parent.name.split("-", 1)[1]))
if not runs:
    sys.exit(f"scaling_sweep: no {sweep}/nodes-*/metrics.csv yet")
print(f"{'nodes':>5} {'epoch s':>10} {'step s':>9} {'K-FAC s':>9} {'steps':>7} {'MB sent':>9} {'top-1':>7}  run")
for path in runs:
    with path.open() as file:
        rows = list(csv.DictReader(file))
    if not rows:
        continue
    row = rows[-1]
    sent = float(row["bytes_sent"] or 0) / 1e6
    print(
        f"{path.parent.name.split('-', 1)[1]:>5} {float(row['epoch_seconds']):10.1f} {float(row['step_seconds']):9.4f}"
        f" {float(row['kfac_step_seconds'] or 0):9.4f} {row['step']:>7} {sent:9.1f} {float(row['val_top1']):7.4f}"
        f"  {path.parent}"
    )
print("step s: mean seconds per optimizer step; K-FAC s: the part of it in the preconditioner; MB sent: K-FAC bytes")
print("rank 0 sent. Weak scaling: images per second = steps x batch x GPUs / epoch s.")
PYEOF
}

if [ "${1:-}" = "--summary" ]; then
    summary
    exit 0
fi

sbatch_options=()
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    sbatch_options+=("$1")
    shift
done
if [ "${1:-}" = "--" ]; then shift; fi
overrides=("${defaults[@]}" "$@")

[ -f "$TEMPLATE" ] || { echo "scaling_sweep: no template $TEMPLATE" >&2; exit 2; }
[ -f "$CONFIG" ] || { echo "scaling_sweep: no config $CONFIG" >&2; exit 2; }
if [ "${DRY_RUN:-0}" != "1" ] && ! command -v sbatch >/dev/null; then
    echo "scaling_sweep: sbatch not found (not on a Slurm login node?); DRY_RUN=1 prints the commands" >&2
    exit 2
fi

failed=0
for nodes in $NODE_COUNTS; do
    if ! [[ "$nodes" =~ ^[1-9][0-9]*$ ]]; then
        echo "scaling_sweep: NODE_COUNTS holds '$nodes', not a node count" >&2
        exit 2
    fi
    run_dir="$SWEEP_DIR/nodes-$nodes"
    command=(sbatch --parsable --nodes="$nodes" --job-name="kfac-scale-${nodes}n" "${sbatch_options[@]}"
        "$TEMPLATE" "${overrides[@]}")
    if [ "${DRY_RUN:-0}" = "1" ]; then
        printf 'CONFIG=%q RUN_DIR=%q' "$CONFIG" "$run_dir"
        printf ' %q' "${command[@]}"
        printf '\n'
        continue
    fi
    mkdir -p "$run_dir"
    if job="$(CONFIG="$CONFIG" RUN_DIR="$run_dir" "${command[@]}")"; then
        echo "scaling_sweep: nodes=$nodes job=$job run_dir=$run_dir"
        echo "$nodes $job" >> "$SWEEP_DIR/jobs.txt"
    else
        echo "scaling_sweep: nodes=$nodes failed (job ${job:-not submitted})" >&2
        failed=1
    fi
done
if [ "${DRY_RUN:-0}" != "1" ]; then
    echo "scaling_sweep: job ids in $SWEEP_DIR/jobs.txt; when they are done: slurm/scaling_sweep.sh --summary"
fi
exit "$failed"
