#!/usr/bin/env bash
# Install Horovod 0.28.1 for PyTorch (Gloo, and MPI where available) into .venv, building it once per machine.
#
# Horovod 0.28.1, the last release, does not build against torch 2.x as released: its CMake asks for C++14 and
# torch's headers need C++17. This script downloads the sdist from PyPI, patches CMAKE_CXX_STANDARD 14 -> 17 in
# CMakeLists.txt and horovod/torch/CMakeLists.txt, builds a wheel (4-10 minutes on 2 cores) and caches it under
#   ${KFAC_DIST_CACHE:-${XDG_CACHE_HOME:-~/.cache}/kfac-dist}/horovod/<horovod>-torch<torch>-<python>-<variant>/
# so later runs on the same machine (fresh clones, CI) install the cached wheel in seconds.
#
# Idempotent: exits at once when horovod 0.28.1 is installed with the controllers asked for and `import
# horovod.torch` works with the installed torch; otherwise installs the cached wheel for this (horovod, torch,
# python, controllers), building it if missing.
#
# Controllers: Gloo always (launch with `horovodrun --gloo`), and MPI too (launch with `mpirun`/`mpiexec` as well)
# when an MPI compiler wrapper `mpicxx` is found, looking next to $PY first (the pip `mpich` of
# requirements/test.txt puts one in .venv/bin). HOROVOD_WITH_MPI=0 builds Gloo only; HOROVOD_WITH_MPI=1 fails
# without an MPI. An MPI build records the MPI library's directory in its run path, so its cache entry is keyed
# by that directory too (a clone elsewhere builds its own).
#
# GPUs: HOROVOD_GPU_OPERATIONS=NCCL (with nvcc on PATH, HOROVOD_NCCL_HOME where NCCL is not in a system path) builds
# the NCCL operations too; such a wheel is cached apart from the CPU ones, and the check above then also asks for NCCL.
# docs/cluster.md ("Horovod") has the cluster recipe.
#
# Environment: PYTHON (default .venv/bin/python), KFAC_DIST_CACHE, HOROVOD_WITH_MPI, HOROVOD_GPU_OPERATIONS,
# MAX_JOBS (build parallelism).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

HOROVOD_VERSION=0.28.1
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
[ -x "$PY" ] || { echo "install_horovod: $PY not found (run scripts/setup.sh first)" >&2; exit 1; }

pip_q() {
    "$PY" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
    return "${PIPESTATUS[0]}"
}

# The controllers to build: gloo, plus mpi where an mpicxx is found (see above).
export PATH="$(dirname "$PY"):$PATH"
MPICXX="$(command -v mpicxx || true)"
case "${HOROVOD_WITH_MPI:-auto}" in
    0) WITH_MPI=0 ;;
    1) [ -n "$MPICXX" ] || { echo "install_horovod: HOROVOD_WITH_MPI=1 but no mpicxx on PATH" >&2; exit 1; }
       WITH_MPI=1 ;;
    *) if [ -n "$MPICXX" ]; then WITH_MPI=1; else WITH_MPI=0; fi ;;
esac
WITH_NCCL=0
[ "${HOROVOD_GPU_OPERATIONS:-}" = NCCL ] && WITH_NCCL=1

horovod_ok() {
    "$PY" - "$HOROVOD_VERSION" "$WITH_MPI" "$WITH_NCCL" <<'PYEOF' >/dev/null 2>&1
import sys

import horovod
import horovod.torch as hvd  # fails when the extension was built against another torch

controllers_ok = hvd.gloo_built() and (hvd.mpi_built() or sys.argv[2] == "0")
nccl_ok = hvd.nccl_built() or sys.argv[3] == "0"
sys.exit(0 if horovod.__version__ == sys.argv[1] and controllers_ok and nccl_ok else 1)
PYEOF
}

if horovod_ok; then
    echo "install_horovod: horovod $HOROVOD_VERSION already installed"
    exit 0
fi

# Runtime dependencies of horovod (the wheel is installed with --no-deps) and build tools.
pip_q install -q -c "$CONSTRAINTS" cloudpickle psutil pyyaml packaging cffi wheel setuptools

TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
PY_TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')"
VARIANT=gloo
if [ "$WITH_MPI" = 1 ]; then
    MPI_PREFIX="$(dirname "$(dirname "$(realpath "$MPICXX")")")"
    VARIANT="gloo-mpi-$(echo "$MPI_PREFIX" | sha256sum | cut -c1-8)"
fi
if [ "$WITH_NCCL" = 1 ]; then
    VARIANT="$VARIANT-nccl"
fi
CACHE_ROOT="${KFAC_DIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kfac-dist}"
CACHE="$CACHE_ROOT/horovod/${HOROVOD_VERSION}-torch${TORCH_VERSION}-${PY_TAG}-${VARIANT}"

install_cached() {
    local wheel
    wheel="$(find "$CACHE" -maxdepth 1 -name "horovod-${HOROVOD_VERSION}-*.whl" 2>/dev/null | head -n 1)"
    [ -n "$wheel" ] || return 1
    echo "install_horovod: installing cached $wheel"
    pip_q install -q --no-deps --force-reinstall -c "$CONSTRAINTS" "$wheel"
}

if ! install_cached; then
    command -v g++ >/dev/null || { echo "install_horovod: g++ is missing (apt-get install -y g++ make)" >&2; exit 1; }
    command -v make >/dev/null || { echo "install_horovod: make is missing (apt-get install -y make)" >&2; exit 1; }
    # Horovod needs CMake >= 3.13; use the system one when it is recent enough, else the pip one.
    cmake_ok='NR == 1 {split($3, v, "."); exit !(v[1] > 3 || (v[1] == 3 && v[2] >= 13))}'
    if ! cmake --version 2>/dev/null | awk "$cmake_ok"; then
        pip_q install -q -c "$CONSTRAINTS" cmake  # lands next to $PY, which is first on PATH
    fi
    unset HOROVOD_WITH_MPI HOROVOD_WITHOUT_MPI
    if [ "$WITH_MPI" = 1 ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi

    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    echo "install_horovod: building horovod $HOROVOD_VERSION ($VARIANT) for torch $TORCH_VERSION, $PY_TAG" \
        "(4-10 min on 2 cores)"
    START=$SECONDS
    pip_q download -q --no-deps --no-binary :all: --no-build-isolation -d "$WORK" "horovod==$HOROVOD_VERSION"
    tar -xzf "$WORK/horovod-$HOROVOD_VERSION.tar.gz" -C "$WORK"
    SRC="$WORK/horovod-$HOROVOD_VERSION"
    for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
        if ! grep -q 'set(CMAKE_CXX_STANDARD 17)' "$f"; then
            echo "install_horovod: C++17 patch did not apply to $f" >&2
            exit 1
        fi
    done

    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1
    export MAKEFLAGS="-j${MAX_JOBS:-$(nproc)}"
    pip_q wheel -q --no-build-isolation --no-deps -w "$WORK/dist" "$SRC"
    WHEEL="$(find "$WORK/dist" -maxdepth 1 -name "horovod-${HOROVOD_VERSION}-*.whl" | head -n 1)"
    [ -n "$WHEEL" ] || { echo "install_horovod: the build produced no wheel" >&2; exit 1; }
    echo "install_horovod: built $(basename "$WHEEL") in $((SECONDS - START)) s"

    # Publish atomically, so an interrupted run never leaves a half-written wheel in the cache.
    mkdir -p "$CACHE"
    cp "$WHEEL" "$CACHE/.$(basename "$WHEEL").tmp"
    mv "$CACHE/.$(basename "$WHEEL").tmp" "$CACHE/$(basename "$WHEEL")"
    install_cached
fi

if ! horovod_ok; then
    echo "install_horovod: horovod installed but 'import horovod.torch' fails:" >&2
    "$PY" -c 'import horovod.torch' >&2 || true
    exit 1
fi
CONTROLLERS='import horovod.torch as h; print(*(c for c in ("gloo", "mpi", "nccl") if getattr(h, f"{c}_built")()))'
echo "install_horovod: horovod $HOROVOD_VERSION ready (controllers: $("$PY" -c "$CONTROLLERS"))"
