"""Repository entry points of the kfac-dist application (``python -m launch.train``, ``python -m launch``).

The application itself is :mod:`kfac_dist.app`, installed with the library; this folder is not installed (a
top-level package named ``launch`` would shadow the published ``launch`` package and ROS 2's launcher). It works
from the repository root, where Slurm templates and the quickstart run.
"""
