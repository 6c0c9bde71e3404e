"""KFAC_DIST_STRICT=1 (set by .ci/run) turns every skipped test into a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def run_probe(tmp_path: Path, strict: bool) -> subprocess.CompletedProcess[str]:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text("import pytest\n\ndef test_needs_x():\n    pytest.skip('x missing')\n")
    env = {**os.environ, "KFAC_DIST_STRICT": "1" if strict else "0"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_probe.py")]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_skip_fails_under_strict_and_skips_otherwise(tmp_path: Path) -> None:
    strict = run_probe(tmp_path, strict=True)
    assert strict.returncode == 1 and "1 failed" in strict.stdout, strict.stdout
    relaxed = run_probe(tmp_path, strict=False)
    assert relaxed.returncode == 0 and "1 skipped" in relaxed.stdout, relaxed.stdout
