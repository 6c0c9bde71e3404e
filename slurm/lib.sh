# shellcheck shell=bash
# Shared part of the sbatch templates in this directory: sourced by them inside the job, never run on its own.
#
# The caller sets KFAC_ROOT (the repository; the templates take $KFAC_DIST_ROOT, else the directory sbatch was run
# from) and CONFIG, then calls kfac_setup "$@" (the script's arguments are key.path=value overrides) and
# kfac_srun_train (one task per GPU) or kfac_srun_torchrun (one torchrun per node). Both run their job step through
# kfac_run_step, which turns the time-limit notice (#SBATCH --signal=B:USR1@120) into a checkpoint and a requeue.
#
# Environment read here (all optional; sbatch passes the submitting shell's environment to the job):
#   KFAC_DIST    the kfac-dist executable   (default: $KFAC_ROOT/.venv/bin/kfac-dist, else kfac-dist on PATH)
#   TORCHRUN     the torchrun executable    (default: $KFAC_ROOT/.venv/bin/torchrun, else torchrun on PATH)
#   DATA_ROOT    adds the override data.root=$DATA_ROOT
#   RUN_DIR      adds the override logging.dir=$RUN_DIR (metrics.csv, checkpoints/; relative to $KFAC_ROOT)
#   MASTER_ADDR  rank 0's host              (default: the first host of the job, from scontrol show hostnames)
#   MASTER_PORT  rank 0's rendezvous port   (default: one per job step, see kfac_step_port; set it to choose one)
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

    # Rank 0 runs on the first host of the allocation; every rank reads MASTER_ADDR (kfac_dist/app/env.py). The port
    # is left to each job step (kfac_step_port), unless MASTER_PORT is set: two steps of this job started at once
    # (srun ... & srun ... &) then meet at different ports instead of joining each other's process group.
    local hosts=()
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [ "${#hosts[@]}" -gt 0 ] || kfac_fail "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"
    MASTER_ADDR="${MASTER_ADDR:-${hosts[0]}}"
    export MASTER_ADDR
    if [ -n "${MASTER_PORT:-}" ]; then export MASTER_PORT; fi

    # Threads per process: the CPUs Slurm gave each task (one task = one process here; torchrun divides them).
    KFAC_OMP_FROM_USER="${OMP_NUM_THREADS:+1}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    # NCCL: off by default except warnings; see slurm/README.md for NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG=INFO.
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

    KFAC_TRAIN_ARGS=(train --config "$CONFIG")
    if [ -n "${DATA_ROOT:-}" ]; then KFAC_TRAIN_ARGS+=("data.root=$DATA_ROOT"); fi
    if [ -n "${RUN_DIR:-}" ]; then KFAC_TRAIN_ARGS+=("logging.dir=$RUN_DIR"); fi
    # A requeued job (kfac_run_step, preemption) continues from its checkpoint whatever the config says; an override
    # among the script's arguments still wins.
    if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then KFAC_TRAIN_ARGS+=("checkpoint.resume=auto"); fi
    KFAC_TRAIN_ARGS+=("$@")

    kfac_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) on ${#hosts[@]} node(s) ${SLURM_JOB_NODELIST}," \
        "${SLURM_NTASKS:-?} task(s), ${SLURM_CPUS_PER_TASK:-?} CPU(s) per task, GPUs per task" \
        "${SLURM_GPUS_PER_TASK:-none}, per node ${SLURM_GPUS_PER_NODE:-none}"
    kfac_log "master ${MASTER_ADDR}:${MASTER_PORT:-<per job step: 15000 + job % 200 * 100 + step % 100>}, OMP_NUM_THREADS=${OMP_NUM_THREADS}, NCCL_DEBUG=${NCCL_DEBUG}"
    kfac_log "cwd ${KFAC_ROOT}; command: ${KFAC_DIST} ${KFAC_TRAIN_ARGS[*]}"
}

# kfac_step_port [JOB_ID [STEP_ID]]: the rendezvous port of a job step (default: this one), the formula of
# slurm_port in kfac_dist/app/env.py: 15000 + (job % 200) * 100 + step % 100. It differs for the first 100 steps of a
# job and for any 200 consecutive job ids. Outside any srun step (the batch script) the step is Slurm's batch step,
# 0xFFFFFFFB, as there.
kfac_step_port() {
    local job="${1:-${SLURM_JOB_ID:?}}" step="${2:-${SLURM_STEP_ID:-4294967291}}"
    echo $((15000 + (job % 200) * 100 + step % 100))
}

# kfac_srun [srun options] COMMAND...: srun over the whole allocation, through kfac_run_step (below). One failing
# task ends the step (and the job) instead of leaving the others blocked in a collective. Slurm 22.05's srun does not
# inherit the job's --cpus-per-task, so it is passed on explicitly.
kfac_srun() {
    local options=(--kill-on-bad-exit=1)
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then options+=("--cpus-per-task=${SLURM_CPUS_PER_TASK}"); fi
    kfac_run_step srun "${options[@]}" "$@"
}

# kfac_run_step srun ...: run one job step so that a coming time limit ends it with a checkpoint and a requeue.
#
# The templates ask Slurm for SIGUSR1 to this batch shell 120 s before the time limit (#SBATCH --signal=B:USR1@120)
# and for a requeueable job (#SBATCH --requeue). The step runs in the background while the shell waits for it. On
# SIGUSR1 the shell passes SIGUSR1 to srun, which forwards it to every task (SIGTERM to srun would end the step at
# once). Every rank then writes one checkpoint after the same step (at most training.log_every_steps steps later,
# kfac_dist/app/preemption.py) and exits with 75; torchrun, told to handle SIGUSR1 (kfac_srun_torchrun), passes it to
# its workers and exits with 1. When the step ends with any code but 0 after SIGUSR1, the shell requeues the job
# (scontrol requeue): Slurm starts it again under the same job id (after its requeue delay, about 2 minutes), and it
# resumes from the checkpoint (checkpoint.resume: auto). SIGTERM to this shell (preemption, scancel, the time limit
# itself) has reached every task from Slurm too: the shell waits for the step and does not requeue (Slurm requeues a
# preempted --requeue job itself; a cancelled job stays cancelled).
kfac_run_step() {
    local rc notice=""
    KFAC_STEP_PID=""
    trap 'notice=1; kfac_log "SIGUSR1: every rank checkpoints and stops"; kill -USR1 "$KFAC_STEP_PID" 2>/dev/null' USR1
    trap 'kfac_log "SIGTERM: waiting for the step to checkpoint and stop"' TERM
    "$@" &  # a command, not a function: $! is srun itself, which forwards SIGUSR1 to the tasks
    KFAC_STEP_PID=$!
    while :; do
        rc=0
        wait "$KFAC_STEP_PID" || rc=$?
        # A trap interrupts wait with a code above 128 while the step still runs: wait again.
        if [ "$rc" -gt 128 ] && kill -0 "$KFAC_STEP_PID" 2>/dev/null; then continue; fi
        break
    done
    trap - USR1 TERM
    if [ -n "$notice" ] && [ "$rc" -ne 0 ]; then
        kfac_log "step ended with exit code $rc after the time-limit notice: requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID" || kfac_fail "scontrol requeue ${SLURM_JOB_ID} failed: resubmit the job"
    fi
    return "$rc"
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
    # torchrun passes these signals to its workers (SIGUSR1: the time-limit notice, see kfac_run_step) and gives them
    # this long to checkpoint and exit before it kills them; torch releases without these options ignore the variables.
    export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
    export PET_SHUTDOWN_TIMEOUT="${PET_SHUTDOWN_TIMEOUT:-110}"
    kfac_log "torchrun: ${nodes} node(s) x ${NPROC_PER_NODE} process(es), ${OMP_NUM_THREADS} thread(s) each"
    # The rendezvous endpoint and id name this job step, known once srun started it: every node's torchrun computes
    # them alike (kfac_step_port is exported to the step's bash).
    export -f kfac_step_port
    # shellcheck disable=SC2016  # expanded by the step's bash, not here
    kfac_srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 bash -c \
        'exec "$0" --rdzv-id="$SLURM_JOB_ID.$SLURM_STEP_ID" \
            --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-$(kfac_step_port)}" "$@"' \
        "$TORCHRUN" --nnodes="$nodes" --nproc-per-node="$NPROC_PER_NODE" --rdzv-backend=c10d \
        --max-restarts=0 --no-python "$KFAC_DIST" "${KFAC_TRAIN_ARGS[@]}"
}
