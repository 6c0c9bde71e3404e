#!/usr/bin/env bash
# Install Slurm and MUNGE from the distribution (Debian/Ubuntu: slurm-wlm, munge) for tests/test_slurm.py, which
# starts its own one-node cluster on loopback (tests/slurm_cluster.py). Nothing is configured or started here.
#
# Idempotent: exits at once when every program the tests use is installed. Otherwise needs root and apt-get
# (about 30 s); elsewhere it says what to install and exits 1.
set -euo pipefail

PROGRAMS=(munged slurmctld slurmd sinfo sbatch srun scontrol scancel squeue)

version() {
    "$(command -v slurmctld || echo /usr/sbin/slurmctld)" -V 2>/dev/null | awk '{print $2}'
}

missing() {
    local name out=()
    for name in "${PROGRAMS[@]}"; do
        command -v "$name" >/dev/null || [ -x "/usr/sbin/$name" ] || [ -x "/sbin/$name" ] || out+=("$name")
    done
    echo "${out[*]}"
}

if [ -z "$(missing)" ]; then
    echo "install_slurm: Slurm $(version) and MUNGE already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm: missing $(missing); run as root (or: sudo apt-get install -y slurm-wlm munge)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install_slurm: missing $(missing) and no apt-get: install Slurm (slurmctld, slurmd, clients) and MUNGE" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "install_slurm: apt-get install slurm-wlm munge (missing: $(missing))"
# A fresh container has no package lists; a stale list can name package versions the mirror no longer has.
apt-get update -qq
apt-get install -y -qq slurm-wlm munge >/dev/null

if [ -n "$(missing)" ]; then
    echo "install_slurm: still missing after apt-get install: $(missing)" >&2
    exit 1
fi
echo "install_slurm: installed Slurm $(version) and MUNGE"
