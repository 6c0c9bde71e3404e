#!/usr/bin/env bash
# Run a command while N busy processes (default: one per core) compete for the CPUs, then stop them; exit with the
# command's exit code. .ci/run uses it to check that the multi-process tests pass under load:
#   bash scripts/with_cpu_hog.sh [-n N] COMMAND [ARGS...]
set -euo pipefail

HOGS="$(getconf _NPROCESSORS_ONLN)"  # not nproc: it honours OMP_NUM_THREADS
if [ "${1:-}" = "-n" ]; then
    HOGS="${2:?with_cpu_hog: -n needs a number}"
    shift 2
fi
if [ "$#" -eq 0 ]; then
    echo "usage: bash scripts/with_cpu_hog.sh [-n N] COMMAND [ARGS...]" >&2
    exit 2
fi

PIDS=()
stop_hogs() {
    if [ "${#PIDS[@]}" -gt 0 ]; then
        kill "${PIDS[@]}" 2> /dev/null || true
        wait "${PIDS[@]}" 2> /dev/null || true
    fi
}
trap stop_hogs EXIT
for _ in $(seq "$HOGS"); do
    sh -c 'while :; do :; done' &
    PIDS+=("$!")
done
echo "with_cpu_hog: $HOGS busy process(es) running beside: $*" >&2
"$@"
