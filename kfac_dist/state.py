"""Restoring a preconditioner's state on any placement, and the collective calls' every-rank check.

``KFACPreconditioner.state_dict()`` gathers every layer's factors and decompositions from their owners;
``load_state_dict()`` hands each rank what its placement keeps (these functions), so a run resumes exactly on any
number of ranks.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from kfac_dist.comm import Communicator, RendezvousTimeout
from kfac_dist.exchange import Exchange
from kfac_dist.registry import LayerState


def require_every_rank(comm: Communicator, what: str, timeout: float) -> None:
    """Raise on this rank unless every rank calls `what` within `timeout` seconds (no collective runs)."""
    try:
        comm.rendezvous(f"KFACPreconditioner.{what}", timeout)
    except RendezvousTimeout as error:
        advice = (
            "save on one: `state = pre.state_dict(); if rank == 0: torch.save(state, path)`"
            if what == "state_dict()"
            else "pass it the same state everywhere"
        )
        raise RuntimeError(
            f"KFACPreconditioner.{what} is collective and must be called on every rank, as each layer's "
            f"factors live on the rank that owns it, but {error.detail}. Call it on every rank and {advice}"
        ) from error


def restore_factors(
    states: Mapping[str, LayerState], factors: Mapping[str, Any], exchange: Exchange, dtype: torch.dtype
) -> None:
    """Give each layer whose factors this rank keeps its saved ``{"A", "G"}`` (others: none); check shapes."""
    unknown = sorted(set(factors) - set(states))
    if unknown:
        raise ValueError(f"state_dict holds factors of modules this preconditioner does not have: {unknown}")
    for name, state in states.items():
        entry = factors.get(name)
        if entry is not None:
            _check_shape(name, "A", entry["A"], state.shape().a_shape())
            _check_shape(name, "G", entry["G"], state.shape().g_shape())
        if entry is None or not exchange.keeps_factors(name):
            state.a = state.g = None
        else:
            # On the model's device, whatever device the state was saved or loaded on (map_location="cpu").
            device = exchange.tensors.device
            state.a = entry["A"].to(device=device, dtype=dtype, copy=True)
            state.g = entry["G"].to(device=device, dtype=dtype, copy=True)


def restore_decompositions(
    states: Mapping[str, LayerState],
    saved: Mapping[str, Any],
    worked: Collection[str],
    exchange: Exchange,
    with_factors: Collection[str],
) -> bool:
    """Give each layer this rank works on its saved decomposition if it fits; whether one with factors has none."""
    missing = False
    for name, state in states.items():
        fields = saved.get(name)
        state.decomposition = None
        if name in worked and fields is not None:
            state.decomposition = exchange.decomposition_from_fields(name, fields)
        missing |= name in worked and state.decomposition is None and name in with_factors
    return missing


def _check_shape(name: str, which: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Refuse a loaded factor whose shape does not fit the module."""
    if tuple(tensor.shape) != expected:
        raise ValueError(f"state_dict factor {which} of {name} has shape {tuple(tensor.shape)}, expected {expected}")
