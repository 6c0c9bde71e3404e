"""Packaging for kfac-dist: the ``kfac_dist`` library and its application ``kfac_dist.app``.

Only ``kfac_dist`` is installed: the repository's top-level ``launch/`` folder (``python -m launch.train``) is not a
package of the distribution, because a top-level ``launch`` would clash with the published ``launch`` package and
ROS 2's launcher. The dependency lists are read from ``requirements/`` (one source for this file and the repository's
scripts); they never pin torch, so ``pip install .`` into an environment with a CUDA torch >= 2.3 keeps it. The
pins of this repository's own environment live in ``requirements/constraints.txt``, used only by ``scripts/``.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def requirements(name: str) -> list[str]:
    """The requirement lines of ``requirements/<name>.txt``, without comments, blank lines and pip options."""
    lines = (line.split("#", 1)[0].strip() for line in (HERE / "requirements" / f"{name}.txt").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


README = HERE / "README.md"

setup(
    name="kfac-dist",
    version="0.1.0",
    description="Distributed K-FAC (Kronecker-factored approximate curvature) preconditioning for PyTorch",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["kfac_dist", "kfac_dist.*"]),
    package_data={"kfac_dist": ["py.typed"]},
    install_requires=requirements("base"),
    extras_require={name: requirements(name) for name in ("bench", "data", "tensorboard")},
    entry_points={"console_scripts": ["kfac-dist = kfac_dist.app.cli:main"]},
)
