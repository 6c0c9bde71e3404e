"""kfac-dist: distributed Kronecker-factored (K-FAC / KFC) gradient preconditioning for PyTorch."""

from kfac_dist.preconditioner import KFACPreconditioner
from kfac_dist.report import Report

__all__ = ["KFACPreconditioner", "Report"]
__version__ = "0.1.0"
