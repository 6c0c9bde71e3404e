"""kfac-dist: distributed Kronecker-factored (K-FAC / KFC) gradient preconditioning for PyTorch."""

from kfac_dist.layers import register_layer_type
from kfac_dist.preconditioner import KFACPreconditioner
from kfac_dist.report import Report

__all__ = ["KFACPreconditioner", "Report", "register_layer_type"]
__version__ = "0.1.0"
