#!/usr/bin/env bash
# Create (or refresh) the repository's virtual environment in .venv.
#
# Idempotent: pip only runs when the requirement files, setup.py, pyproject.toml, this script or
# scripts/install_horovod.sh changed since the last successful run (a hash of them is kept in
# .venv/.kfac-dist-setup.stamp). Set KFAC_DIST_FORCE_SETUP=1 to force it.
# The interpreter used to create .venv is $PYTHON (default: python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.kfac-dist-setup.stamp"

if [ ! -x "$PY" ]; then
    echo "setup: creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

# System packages for the Slurm tests (idempotent, fast when present; needs root + apt, else it says what to do).
if [ "${KFAC_DIST_SKIP_SLURM:-0}" != "1" ]; then
    bash scripts/install_slurm.sh || echo "setup: Slurm is not installed; tests/test_slurm.py will skip (fail under KFAC_DIST_STRICT=1)" >&2
fi

HASH="$({
    cat requirements/*.txt setup.py pyproject.toml scripts/setup.sh scripts/install_horovod.sh
    echo "skip-horovod=${KFAC_DIST_SKIP_HOROVOD:-0}"
} | sha256sum | cut -d' ' -f1)"
if [ "${KFAC_DIST_FORCE_SETUP:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
    echo "setup: $VENV is up to date"
    exit 0
fi

# pip, quiet, without the "Location ... is ignored" noise of index directories that this machine's pip config lists.
pip_install() {
    "$PY" -m pip --disable-pip-version-check install -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
}
# The constraints pin torch==2.13.0 (the local CPU wheel) for every step, so nothing can pull another torch.
# torchvision (pulled by backpack-for-pytorch <- curvlinops-for-pytorch) is pinned to 0.28.0, whose only deps are
# torch==2.13.0, numpy and pillow: no CUDA packages come with it. It cannot be imported on the CPU torch, and nothing
# here imports it.
pip_install -c requirements/constraints.txt -r requirements/test.txt
pip_install --no-deps -c requirements/constraints.txt -r requirements/nodeps.txt
pip_install --no-deps -e .

# Horovod (tests/test_backend_horovod.py): built from source once per machine (~11 min), then installed from the
# wheel cached under ~/.cache/kfac-dist in seconds; a no-op when it is installed. KFAC_DIST_SKIP_HOROVOD=1 skips
# it (the Horovod tests then skip, which fails them under KFAC_DIST_STRICT=1).
if [ "${KFAC_DIST_SKIP_HOROVOD:-0}" != "1" ]; then
    PYTHON="$PY" bash scripts/install_horovod.sh
fi

# Guard: a CUDA torch (and its nvidia-* packages) must never end up here.
"$PY" - <<'PYEOF'
import importlib.metadata as md
import sys

torch_version = md.version("torch")
cuda = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia"))
if not torch_version.startswith("2.13.0") or cuda:
    sys.exit(f"setup: unexpected environment: torch {torch_version}, CUDA packages {cuda}")
print(f"setup: torch {torch_version}, no CUDA packages")
PYEOF

echo "$HASH" > "$STAMP"
echo "setup: done"
