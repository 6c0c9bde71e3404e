"""KAISA's preconditioner (kfac-pytorch's ``kfac`` package) for the overhead benchmark's ``--compare-kaisa`` arms.

kfac-pytorch is not a dependency and never part of this project: the arms import it where the user made it
importable (``PYTHONPATH=<dir containing the kfac package>``, e.g. a copy of kfac-pytorch 0.4.2, or
``pip install kfac-pytorch==0.4.2``). In one process KAISA needs no ``torch.distributed`` group: its rank and world
size default to 0 and 1 and it skips every collective of a group of one (kfac-pytorch 0.4.2,
``kfac/distributed.py``).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
from torch import nn

from kfac_dist.options import KFACOptions

__all__ = ["KAISA_DAMPING", "KAISA_METHODS", "KaisaUnavailable", "kaisa_preconditioner", "require_kaisa"]

#: kfac-dist's compute methods that KAISA has too (``kfac.enums.ComputeMethod``).
KAISA_METHODS = ("eigen", "inverse")

#: KAISA's damping: its ResNet-50 value, which acts on the fc layer as kfac-dist's default 1.0 does (the two are in
#: different factor scales, docs/migrating-from-kaisa.md); the damping does not change what a step costs.
KAISA_DAMPING = 0.001
#: How to make KAISA importable.
HINT = (
    "make KAISA's `kfac` package importable: PYTHONPATH=<dir containing the kfac package> "
    "(e.g. PYTHONPATH=$PWD:../shared/anchors/kfac-pytorch-0.4.2) or pip install kfac-pytorch==0.4.2"
)


class KaisaUnavailable(RuntimeError):
    """``--compare-kaisa`` was asked for and KAISA's ``kfac`` package does not import."""


def require_kaisa() -> Any:
    """KAISA's ``kfac`` package with its ``preconditioner`` and ``enums`` modules.

    Raises:
        KaisaUnavailable: If they do not import (the message names ``--compare-kaisa`` and the fix).
    """
    try:
        importlib.import_module("kfac.preconditioner")
        importlib.import_module("kfac.enums")
        return importlib.import_module("kfac")
    except ImportError as error:
        raise KaisaUnavailable(f"--compare-kaisa: cannot import KAISA ({error}); {HINT}") from None


def kaisa_preconditioner(model: nn.Module, options: KFACOptions, lr: float) -> Any:
    """KAISA's ``KFACPreconditioner`` on `model` with the frequencies, decay, KL-clip and method of `options`.

    The damping is :data:`KAISA_DAMPING`; the gradient-worker fraction 1 (every layer's decompositions on this
    one process, as kfac-dist's arm has them); factors and decompositions in float32 as kfac-dist keeps them (KAISA
    would otherwise keep its factors in the activations' dtype, bf16 under autocast).
    """
    kfac = require_kaisa()
    return kfac.preconditioner.KFACPreconditioner(
        model,
        factor_update_steps=options.factor_update_steps,
        inv_update_steps=options.inv_update_steps,
        damping=KAISA_DAMPING,
        factor_decay=options.factor_decay,
        kl_clip=options.kl_clip,
        lr=lr,
        compute_method=kfac.enums.ComputeMethod[options.compute_method.upper()],
        grad_worker_fraction=1.0,
        factor_dtype=torch.float32,
        inv_dtype=torch.float32,
        loglevel=logging.DEBUG,
    )
