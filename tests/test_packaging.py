"""Packaging: what ``pip install`` of kfac-dist installs, and that it keeps a user's torch.

The distribution holds only the ``kfac_dist`` package (the application is ``kfac_dist.app``; the repository's
top-level ``launch/`` folder is not installed). Its requirements never pin torch, so installing it into an
environment that already has a (CUDA) torch leaves that torch alone: checked in a fresh virtual environment that
gets torch first and kfac-dist second. The torch pin of this repository's own .venv lives in
requirements/constraints.txt only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
SOURCES = ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "requirements", "kfac_dist", "launch")
TORCH_REQUIREMENT = re.compile(r"^torch\b(?P<spec>[^;#]*)", re.IGNORECASE)


def run(command: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `command`, failing the test with its output when it fails (or on timeout)."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of kfac-dist, built from a copy of the sources (the build writes build/ and *.egg-info)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, source / name)
    dist = source / "dist"
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), "."]
    run(command, cwd=source, timeout=300)
    (built,) = dist.glob("kfac_dist-*.whl")
    return built


def metadata(wheel: Path) -> list[str]:
    """The lines of the wheel's METADATA file."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = (n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return archive.read(name).decode().splitlines()


def test_wheel_installs_only_kfac_dist(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    top_level = {name.split("/", 1)[0] for name in names}
    assert top_level == {"kfac_dist", wheel.name.split("-py3")[0] + ".dist-info"}, sorted(top_level)
    assert not any(name.startswith("launch/") for name in names)
    for module in ("kfac_dist/app/train.py", "kfac_dist/app/cli.py", "kfac_dist/py.typed"):
        assert module in names, module
    assert any(name.endswith(".dist-info/licenses/LICENSE") or name.endswith(".dist-info/LICENSE") for name in names)
    assert "kfac-dist = kfac_dist.app.cli:main" in entry_points


def test_requirements_never_pin_torch(wheel: Path) -> None:
    requires = [line.split(":", 1)[1].strip() for line in metadata(wheel) if line.startswith("Requires-Dist:")]
    torch_specs = [match["spec"].strip() for r in requires if (match := TORCH_REQUIREMENT.match(r))]
    assert torch_specs == [">=2.3"], requires
    extras = {line.split(":", 1)[1].strip() for line in metadata(wheel) if line.startswith("Provides-Extra:")}
    assert {"bench", "data", "tensorboard"} <= extras, extras
    # Every requirement file but the constraints (this repository's scripts only) leaves torch's version open.
    for path in sorted((ROOT / "requirements").glob("*.txt")):
        for line in path.read_text().splitlines():
            match = TORCH_REQUIREMENT.match(line.strip())
            if path != CONSTRAINTS and match and match["spec"].strip() not in ("", ">=2.3"):
                pytest.fail(f"{path.name} pins torch: {line!r} (pins belong in constraints.txt)")
    assert re.search(r"^torch==\S+", CONSTRAINTS.read_text(), re.MULTILINE), "constraints.txt lost its torch pin"


def torch_state(python: Path, cwd: Path) -> tuple[str, str, str]:
    """The torch in `python`'s environment: its version, its location, and a digest of its RECORD (every file)."""
    code = (
        "import importlib.metadata as md, hashlib, torch; d = md.distribution('torch'); "
        "print(torch.__version__, torch.__file__, hashlib.sha256(d.read_text('RECORD').encode()).hexdigest())"
    )
    version, location, record = run([str(python), "-c", code], cwd=cwd, timeout=120).stdout.split()
    return version, location, record


@pytest.mark.timeout(900)  # installs torch into a fresh environment: about a minute, more on busy cores
def test_pip_install_keeps_the_users_torch(wheel: Path, tmp_path: Path) -> None:
    """A user's environment with torch, then `pip install kfac-dist`: torch is untouched, the app runs.

    The torch here is this repository's pinned one (the wheel this machine has); what matters is that the install
    neither replaces nor reinstalls it, which a torch pin or an upper bound in the requirements would cause for a
    user whose CUDA torch differs.
    """
    env_dir = tmp_path / "user-env"
    try:
        venv.EnvBuilder(with_pip=True).create(env_dir)
        python = env_dir / "bin" / "python"
        pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", "-q"]
        run([*pip, "-c", str(CONSTRAINTS), "torch"], cwd=tmp_path, timeout=600)
        before = torch_state(python, tmp_path)
        (record_path,) = env_dir.glob("lib/python*/site-packages/torch-*.dist-info/RECORD")
        mtime = record_path.stat().st_mtime_ns

        # The user's pip would replace a torch the requirements exclude; pinning the installed one turns that into
        # a quick resolver error here instead of a download of another torch (GBs for a CUDA build).
        keep = tmp_path / "keep-torch.txt"
        keep.write_text(f"torch=={before[0]}\n")
        run([*pip, "-c", str(keep), str(wheel)], cwd=tmp_path, timeout=300)

        assert torch_state(python, tmp_path) == before
        assert record_path.stat().st_mtime_ns == mtime, "pip reinstalled torch"
        kfac_dist = str(env_dir / "bin" / "kfac-dist")
        assert "name: mnist-5k" in run([kfac_dist, "train", "--print-config"], cwd=tmp_path, timeout=120).stdout
        probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('launch') is not None)"
        run([str(python), "-c", probe], cwd=tmp_path, timeout=60)  # no top-level `launch` package was installed
    finally:
        shutil.rmtree(env_dir, ignore_errors=True)  # about 1 GB: not kept with pytest's last temporary directories


@pytest.mark.parametrize(
    "command",
    [
        ["kfac-dist", "train", "--print-config"],
        ["-m", "launch.train", "--print-config"],
        ["-m", "launch", "train", "--print-config"],
        ["-m", "kfac_dist.app.train", "--print-config"],
    ],
    ids=["console-script", "launch.train", "launch", "kfac_dist.app.train"],
)
def test_entry_points_print_the_config(command: list[str]) -> None:
    """Every documented way to start training works from the repository root."""
    if command[0] == "kfac-dist":
        argv = [str(Path(sys.executable).parent / "kfac-dist"), *command[1:]]
    else:
        argv = [sys.executable, *command]
    assert "name: mnist-5k" in run(argv, cwd=ROOT, timeout=120).stdout
