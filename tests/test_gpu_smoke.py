"""scripts/gpu_smoke.sh: its dry run on the CPU passes every check, and a failing check fails the script.

The GPU itself is checked where one is at hand (docs/cluster.md records the run); here the script's own logic runs:
the same library comparisons, distributed runs and app runs, on the CPU with gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from kfac_dist.comm import LocalCommunicator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_smoke  # noqa: E402


def run_smoke(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/gpu_smoke.sh", "--cpu"],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "KFAC_SMOKE_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_dry_run_passes_every_check(tmp_path: Path) -> None:
    result = run_smoke(tmp_path)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [line for line in lines if line.startswith("FAIL")]
    passed = [line for line in lines if line.startswith("PASS")]
    # 2 library + 6 per world size (W=1, 2) + 2 runs x 2 precisions (no fp16 on the CPU) + gloo W=2.
    assert len(passed) == 2 + 12 + 4 + 1, result.stdout
    assert sum("resumed to epoch 2" in line for line in passed) == 2
    assert lines[-1] == "gpu_smoke: all checks passed"


def test_a_failing_check_fails_the_script(tmp_path: Path) -> None:
    result = run_smoke(tmp_path, KFAC_SMOKE_CHECKS="app", KFAC_SMOKE_MIN_ACCURACY="1.01")
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert result.returncode == 1, result.stdout + result.stderr
    # amp=none and bf16 stop after their first run; the gloo W=2 run fails too.
    assert len(failed) == 3 and all("is not >= 1.01" in line for line in failed), result.stdout


def test_an_unknown_check_group_is_refused(tmp_path: Path) -> None:
    result = run_smoke(tmp_path, KFAC_SMOKE_CHECKS="library gpu")
    assert result.returncode == 2 and "KFAC_SMOKE_CHECKS: unknown group 'gpu'" in result.stderr


def test_the_parameter_comparison_sees_a_wrong_run() -> None:
    whole = slice(None)
    args = (LocalCommunicator(), "eigen", "comm-opt", whole, gpu_smoke.LOCAL_BATCH)
    reference = gpu_smoke.train(torch.device("cpu"), *args, gpu_smoke.no_average)

    def halve_gradients(model: torch.nn.Module) -> None:  # e.g. a sum where an average belongs
        for p in model.parameters():
            p.grad.mul_(0.5)

    wrong = gpu_smoke.train(torch.device("cpu"), *args, halve_gradients)
    assert gpu_smoke.relative_difference(wrong, reference) > 1e3 * gpu_smoke.TOLERANCE
    assert not gpu_smoke.report("wrong run", gpu_smoke.relative_difference(wrong, reference))
