#!/usr/bin/env bash
# What to run on a GPU node before a long job: kfac-dist's library and application on CUDA, one PASS/FAIL line per
# check, exit code 1 if any check failed. Run from the repository root in the job's Python environment:
#
#   bash scripts/gpu_smoke.sh            # on a GPU node (e.g. srun -N1 --gpus=1 bash scripts/gpu_smoke.sh)
#   bash scripts/gpu_smoke.sh --cpu      # the same checks on the CPU with gloo (a dry run of the script itself)
#
# Checks:
#   library    K-FAC on the GPU vs the CPU in float64, every layer kind, eigen and inverse (scripts/gpu_smoke.py)
#   nccl W=1   one rank under torchrun with NCCL vs one process; every grad_worker_fraction and method
#   nccl W=2   the same on two GPUs (only where the node has >= 2 GPUs)
#   app        `kfac-dist train` on MNIST-5k under torchrun (1 rank: no process group) in fp32, fp16 and bf16:
#              one epoch with a checkpoint, then a resume to the second epoch; both must end with a test accuracy
#              above chance
#   app gloo   two ranks with gloo on one GPU (CUDA tensors staged through the host), one epoch
#
# Environment: PYTHON (default python3), KFAC_SMOKE_DIR (logs and runs; default runs/gpu_smoke),
# KFAC_SMOKE_CHECKS (default "library distributed app": the groups to run), and KFAC_SMOKE_MIN_ACCURACY
# (default 0.5: MNIST-5k after one epoch of K-FAC is far above it; chance is 0.1).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
DIR="${KFAC_SMOKE_DIR:-runs/gpu_smoke}"
MIN_ACCURACY="${KFAC_SMOKE_MIN_ACCURACY:-0.5}"
CHECKS=" ${KFAC_SMOKE_CHECKS:-library distributed app} "
for group in $CHECKS; do
    case "$group" in
        library | distributed | app) ;;
        *) echo "gpu_smoke: KFAC_SMOKE_CHECKS: unknown group '$group'; allowed: library distributed app" >&2; exit 2 ;;
    esac
done
wanted() { [[ "$CHECKS" == *" $1 "* ]]; }
CPU=0
if [ "${1:-}" = "--cpu" ]; then
    CPU=1
elif [ -n "${1:-}" ]; then
    echo "usage: bash scripts/gpu_smoke.sh [--cpu]" >&2
    exit 2
fi
mkdir -p "$DIR"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

FAILED=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; FAILED=1; }

GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [ "$CPU" = 1 ]; then
    DEVICE=cpu BACKEND=gloo GPUS=0
elif [ "$GPUS" -ge 1 ]; then
    DEVICE=cuda BACKEND=nccl
else
    fail "cuda: no CUDA device visible to $PYTHON (torch.cuda.device_count() = $GPUS); --cpu runs the dry run"
    exit 1
fi
"$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, devices:",
    [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'

# Library checks print their own PASS/FAIL lines; a crash (no line) is reported here.
python_checks() {
    local name="$1" log="$2"
    shift 2
    "$@" > "$log" 2>&1
    local rc=$?
    grep -E "^(PASS|FAIL) " "$log"
    if [ "$rc" -ne 0 ] && ! grep -q "^FAIL " "$log"; then
        fail "$name: exit code $rc (log: $log)"
    elif [ "$rc" -ne 0 ]; then
        FAILED=1
    fi
}

torchrun() {
    local ranks="$1"
    shift
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$ranks" "$@"
}

if wanted library; then
    python_checks "library" "$DIR/library.log" "$PYTHON" scripts/gpu_smoke.py library --device "$DEVICE"
fi
if wanted distributed; then
    python_checks "$BACKEND W=1" "$DIR/distributed_w1.log" \
        torchrun 1 scripts/gpu_smoke.py distributed --backend "$BACKEND"
    if [ "$CPU" = 1 ] || [ "$GPUS" -ge 2 ]; then
        python_checks "$BACKEND W=2" "$DIR/distributed_w2.log" \
            torchrun 2 scripts/gpu_smoke.py distributed --backend "$BACKEND"
    else
        echo "SKIP $BACKEND W=2: this node has $GPUS GPU(s)"
    fi
fi

# The app: final accuracy from its last line "final test accuracy: X".
accuracy_of() { sed -n 's/^final test accuracy: \([0-9.]*\)$/\1/p' "$1" | tail -n 1; }
above() { "$PYTHON" -c "import sys; sys.exit(0 if float('$1') >= float('$2') else 1)" 2>/dev/null; }

app_check() {
    local name="$1" ranks="$2" log="$3"
    shift 3
    torchrun "$ranks" -m kfac_dist.app.train --config configs/mnist_cnn.yaml training.device="$DEVICE" "$@" \
        > "$log" 2>&1
    local rc=$?
    local accuracy
    accuracy="$(accuracy_of "$log")"
    if [ "$rc" -ne 0 ]; then
        fail "$name: exit code $rc (log: $log)"
        return 1
    elif [ -z "$accuracy" ] || ! above "$accuracy" "$MIN_ACCURACY"; then
        fail "$name: final test accuracy '${accuracy}' is not >= $MIN_ACCURACY (log: $log)"
        return 1
    fi
    pass "$name: final test accuracy $accuracy"
}

for amp in none fp16 bf16; do
    wanted app || break
    if [ "$amp" = fp16 ] && [ "$DEVICE" = cpu ]; then
        echo "SKIP app amp=fp16: needs CUDA"
        continue
    fi
    run="$DIR/app_$amp"
    rm -rf "$run"
    common=(training.amp="$amp" logging.dir="$run" comm.backend="$BACKEND" checkpoint.every_epochs=1)
    app_check "app W=1 amp=$amp, epoch 1 with a checkpoint" 1 "$run.train.log" \
        "${common[@]}" training.epochs=1 || continue
    if ! ls "$run"/checkpoints/*.pt > /dev/null 2>&1; then
        fail "app amp=$amp: no checkpoint under $run/checkpoints"
        continue
    fi
    if app_check "app W=1 amp=$amp, resumed to epoch 2" 1 "$run.resume.log" \
        "${common[@]}" training.epochs=2 checkpoint.resume=auto; then
        grep -q "^resumed from " "$run.resume.log" || fail "app amp=$amp: the second run did not resume (log: $run.resume.log)"
    fi
done

if wanted app; then
    rm -rf "$DIR/app_gloo_w2"
    app_check "app gloo W=2 on one $DEVICE device" 2 "$DIR/app_gloo_w2.log" \
        comm.backend=gloo training.epochs=1 logging.dir="$DIR/app_gloo_w2"
fi

if [ "$FAILED" = 0 ]; then
    echo "gpu_smoke: all checks passed"
else
    echo "gpu_smoke: FAILED (logs under $DIR)"
fi
exit "$FAILED"
