# shellcheck shell=bash
# Shared part of the sbatch templates in this directory: sourced by them inside the job, never run on its own.
#
# The caller sets KFAC_ROOT (the repository; the templates take $KFAC_DIST_ROOT, else the directory sbatch was run
# from) and CONFIG, then calls kfac_setup "$@" (the script's arguments are key.path=value overrides) and
# kfac_srun_train (one task per GPU) or kfac_srun_torchrun (one torchrun per node).
#
# Environment read here (all optional; sbatch passes the submitting shell's environment to the job):
#   KFAC_DIST    the kfac-dist executable   (default: $KFAC_ROOT/.venv/bin/kfac-dist, else kfac-dist on PATH)
#   TORCHRUN     the torchrun executable    (default: $KFAC_ROOT/.venv/bin/torchrun, else torchrun on PATH)
#   PYTHON       used to probe the port     (default: $KFAC_ROOT/.venv/bin/python, else python3)
#   DATA_ROOT    adds the override data.root=$DATA_ROOT
#   RUN_DIR      adds the override logging.dir=$RUN_DIR (metrics.csv, checkpoints/; relative to $KFAC_ROOT)
#   MASTER_ADDR  rank 0's host              (default: the first host of the job, from scontrol show hostnames)
#   MASTER_PORT  rank 0's rendezvous port   (default: 15000 + job id % 20000, or a free port if that one is taken)
#   OMP_NUM_THREADS  threads per process    (default: the CPUs per process that Slurm gave)
#   NCCL_*, GLOO_SOCKET_IFNAME  passed through unchanged; slurm/README.md lists the ones that matter.

kfac_fail() {
    echo "kfac-dist slurm: error: $*" >&2
    exit 2
}

kfac_log() {
    echo "kfac-dist slurm: $*"
}

# kfac_executable NAME DEFAULT_PATH: the variable NAME if set, else DEFAULT_PATH if executable, else the command
# of the same base name on PATH.
kfac_executable() {
    local value="${!1:-}" fallback="$2"
    if [ -z "$value" ]; then
        if [ -x "$fallback" ]; then
            value="$fallback"
        else
            value="$(command -v "$(basename "$fallback")" || true)"
        fi
    fi
    if [ -z "$value" ] || ! command -v "$value" >/dev/null; then
        kfac_fail "$1: '${value:-$(basename "$fallback")}' not found (run scripts/setup.sh, or set $1=/path/to/it)"
    fi
    printf '%s\n' "$value"
}

# kfac_setup [key.path=value ...]: check the job, pick the executables, rank 0's address and port, the training
# command line (KFAC_TRAIN_ARGS), and print them.
kfac_setup() {
    [ -n "${SLURM_JOB_ID:-}" ] || kfac_fail "not inside a Slurm job: submit this script with sbatch (slurm/README.md)"
    if [ -z "${KFAC_ROOT:-}" ] || [ ! -d "$KFAC_ROOT" ]; then
        kfac_fail "KFAC_ROOT='${KFAC_ROOT:-}' is not a directory"
    fi
    cd "$KFAC_ROOT" || kfac_fail "cannot cd to $KFAC_ROOT"
    [ -n "${CONFIG:-}" ] || kfac_fail "CONFIG is not set"
    [ -f "$CONFIG" ] || kfac_fail "config '$CONFIG' not found (relative paths start at $KFAC_ROOT)"

    KFAC_DIST="$(kfac_executable KFAC_DIST "$KFAC_ROOT/.venv/bin/kfac-dist")"
    if [ -x "$KFAC_ROOT/.venv/bin/python" ]; then PYTHON="${PYTHON:-$KFAC_ROOT/.venv/bin/python}"; fi
    PYTHON="${PYTHON:-python3}"

    # Rank 0 runs on the first host of the allocation; every rank reads MASTER_ADDR/MASTER_PORT (kfac_dist/app/env.py).
    local hosts=()
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [ "${#hosts[@]}" -gt 0 ] || kfac_fail "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"
    MASTER_ADDR="${MASTER_ADDR:-${hosts[0]}}"
    if [ -z "${MASTER_PORT:-}" ]; then
        # Derived from the job id, as kfac_dist/app/env.py does, so two jobs sharing a node do not collide. The batch
        # script runs on the allocation's first host: when that is MASTER_ADDR, make sure the port is free there.
        MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))
        if [ "${SLURMD_NODENAME:-}" = "$MASTER_ADDR" ]; then
            MASTER_PORT="$(kfac_free_port "$MASTER_PORT")"
        fi
    fi
    export MASTER_ADDR MASTER_PORT

    # Threads per process: the CPUs Slurm gave each task (one task = one process here; torchrun divides them).
    KFAC_OMP_FROM_USER="${OMP_NUM_THREADS:+1}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    # NCCL: off by default except warnings; see slurm/README.md for NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG=INFO.
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

    KFAC_TRAIN_ARGS=(train --config "$CONFIG")
    if [ -n "${DATA_ROOT:-}" ]; then KFAC_TRAIN_ARGS+=("data.root=$DATA_ROOT"); fi
    if [ -n "${RUN_DIR:-}" ]; then KFAC_TRAIN_ARGS+=("logging.dir=$RUN_DIR"); fi
    KFAC_TRAIN_ARGS+=("$@")

    kfac_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) on ${#hosts[@]} node(s) ${SLURM_JOB_NODELIST}," \
        "${SLURM_NTASKS:-?} task(s), ${SLURM_CPUS_PER_TASK:-?} CPU(s) per task, GPUs per task" \
        "${SLURM_GPUS_PER_TASK:-none}, per node ${SLURM_GPUS_PER_NODE:-none}"
    kfac_log "master ${MASTER_ADDR}:${MASTER_PORT}, OMP_NUM_THREADS=${OMP_NUM_THREADS}, NCCL_DEBUG=${NCCL_DEBUG}"
    kfac_log "cwd ${KFAC_ROOT}; command: ${KFAC_DIST} ${KFAC_TRAIN_ARGS[*]}"
}

# kfac_free_port PORT: PORT if it can be bound on this host, else a port the kernel picks.
kfac_free_port() {
    "$PYTHON" - "$1" <<'PYEOF'
import socket
import sys

port = int(sys.argv[1])
with socket.socket() as sock:
    try:
        sock.bind(("", port))
    except OSError:
        sock.bind(("", 0))
    print(sock.getsockname()[1])
PYEOF
}

# kfac_srun [srun options] COMMAND...: srun over the whole allocation. One failing task ends the step (and the
# job) instead of leaving the others blocked in a collective. Slurm 22.05's srun does not inherit the job's
# --cpus-per-task, so it is passed on explicitly.
kfac_srun() {
    local options=(--kill-on-bad-exit=1)
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then options+=("--cpus-per-task=${SLURM_CPUS_PER_TASK}"); fi
    srun "${options[@]}" "$@"
}

# kfac_srun_train: one kfac-dist process per task (= per GPU); each reads its rank from srun's SLURM_* variables.
kfac_srun_train() {
    kfac_srun "$KFAC_DIST" "${KFAC_TRAIN_ARGS[@]}"
}

# kfac_srun_torchrun: one torchrun per node, each starting NPROC_PER_NODE processes (default: the GPUs Slurm gave
# the node), meeting at MASTER_ADDR:MASTER_PORT through torch's c10d rendezvous.
kfac_srun_torchrun() {
    local nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}" gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
    gpus="${gpus##*:}"  # "a100:4" -> 4
    NPROC_PER_NODE="${NPROC_PER_NODE:-$gpus}"
    if ! [[ "${NPROC_PER_NODE}" =~ ^[1-9][0-9]*$ ]]; then
        kfac_fail "NPROC_PER_NODE='${NPROC_PER_NODE}': no GPUs per node in this job; set NPROC_PER_NODE"
    fi
    TORCHRUN="$(kfac_executable TORCHRUN "$KFAC_ROOT/.venv/bin/torchrun")"
    # torchrun gives each of its processes an equal share of the node's CPUs unless OMP_NUM_THREADS was set.
    if [ -z "${KFAC_OMP_FROM_USER:-}" ]; then
        OMP_NUM_THREADS=$(((${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE} + NPROC_PER_NODE - 1) / NPROC_PER_NODE))
        export OMP_NUM_THREADS
    fi
    kfac_log "torchrun: ${nodes} node(s) x ${NPROC_PER_NODE} process(es), ${OMP_NUM_THREADS} thread(s) each"
    kfac_srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 \
        "$TORCHRUN" --nnodes="$nodes" --nproc-per-node="$NPROC_PER_NODE" \
        --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" \
        --max-restarts=0 --no-python "$KFAC_DIST" "${KFAC_TRAIN_ARGS[@]}"
}
