"""Packaging for kfac-dist: the ``kfac_dist`` library and the ``launch`` application."""

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="kfac-dist",
    version="0.1.0",
    description="Distributed K-FAC (Kronecker-factored approximate curvature) preconditioning for PyTorch",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kfac_dist", "kfac_dist.*", "launch", "launch.*"]),
    package_data={"kfac_dist": ["py.typed"]},
    install_requires=["torch>=2.3", "numpy", "pyyaml", "pillow"],
    extras_require={"data": ["mlxtend"], "tensorboard": ["tensorboard"]},
    entry_points={"console_scripts": ["kfac-dist = launch.cli:main"]},
)
