"""Two job steps of one Slurm job started at once (``srun ... & srun ... &``) train side by side, each on its own
rendezvous port (kfac_dist/app/env.py derives it from the job id and the step id), on the loopback test cluster of
tests/slurm_cluster.py. Before, both steps derived the job's one port and a rank of one joined the other's group.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from slurm_cluster import REPO, SlurmCluster, slurm_cluster_fixture  # noqa: F401  (registers `slurm_cluster`)

from kfac_dist.app.metrics import read_metrics

KFAC_DIST = Path(sys.executable).parent / "kfac-dist"

TWO_STEPS = """#!/bin/bash
# Two steps of this job at once, 2 tasks each; the job fails unless both do.
set -u
for run in a b; do
    srun -n 2 --cpus-per-task=1 --exact --kill-on-bad-exit=1 "$KFAC_DIST" train --config configs/mnist_cnn.yaml \\
        "logging.dir=$RUNS/$run" training.epochs=1 training.max_steps=15 comm.backend=gloo comm.timeout_s=60 &
done
codes=()
for job in $(jobs -p); do wait "$job"; codes+=("$?"); done
echo "step exit codes: ${codes[*]}"
[ "${codes[*]}" = "0 0" ]
"""


def test_two_steps_of_one_job_at_once_each_train_with_their_own_ranks(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    script, runs, output = tmp_path / "two_steps.sh", tmp_path / "runs", tmp_path / "job-%j.out"
    script.write_text(TWO_STEPS)
    options = ["--nodes=1", "--ntasks=4", "--cpus-per-task=1", "--time=10", f"--output={output}"]
    result = slurm_cluster.run(
        ["sbatch", "--wait", *options, str(script)],
        timeout=300,
        env={"KFAC_DIST": str(KFAC_DIST), "RUNS": str(runs)},
        cwd=REPO,
    )
    job = re.search(r"Submitted batch job (\d+)", result.stdout)
    text = next(tmp_path.glob("job-*.out")).read_text(errors="replace") if job else ""
    context = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}\n--- job output ---\n{text[-5000:]}"
    assert result.returncode == 0, context
    assert "step exit codes: 0 0" in text, context
    assert "belongs to another run" not in text, context
    for run in ("a", "b"):
        rows = read_metrics(runs / run / "metrics.csv")
        assert len(rows) == 1 and int(rows[0]["bytes_sent"]) > 0, context  # each step: its own two ranks
