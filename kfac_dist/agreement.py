"""The start-up check that every rank built its preconditioner with the same options.

Ranks that disagree on an option either diverge silently (``damping``, ``kl_clip``, ``lr``: each replica steps
differently) or post different collectives and wait for each other until the timeout (``factor_comm``,
``symmetric_comm``, ``bucket_cap_mb``, ``compute_method``, the dtypes). :func:`describe_options` turns the options
into one comparable line each; the preconditioner gathers every rank's lines once, at construction and before any
collective of its own groups, and :func:`option_differences` names every option that differs, with each rank's
value.

A hyperparameter given as a callable of the step is compared by its value at step 0, marked as a callable: two
schedules that agree at step 0 but not later cannot be told apart without calling them at every step (or
comparing code, which differs between equal closures). ``profile`` is not compared: it only times phases on the
rank that asks for it. ``communicator`` is not an option of the run but the means of the check.
"""

from __future__ import annotations

from collections.abc import Mapping

from kfac_dist.options import check_value, range_of

_MAX_VALUE_CHARS = 80


def describe_options(options: Mapping[str, object]) -> str:
    """One ``name=value`` line per option, in the given order, comparable between ranks.

    Numbers are written exactly (``repr`` of the float); a callable hyperparameter as its value at step 0 followed
    by ``(callable)``, or the error it raised there; anything else by its ``repr`` (``None``, strings, dtypes,
    tuples of patterns). A ``grad_scaler`` is described by its type only (its scale changes as it runs).
    """
    lines = []
    for name, value in options.items():
        if name == "grad_scaler":
            text = "None" if value is None else type(value).__qualname__
        elif callable(value):
            try:
                text = f"{check_value(name, value(0), range_of(name), 0)!r} (callable)"
            except (ValueError, TypeError, ArithmeticError) as error:  # reported by step(), on every rank alike
                text = f"a callable raising {type(error).__name__} at step 0"
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            text = repr(float(value))
        else:
            text = repr(value)
        lines.append(f"{name}={' '.join(text.split())[:_MAX_VALUE_CHARS]}")
    return "\n".join(lines)


def option_differences(gathered: list[str]) -> str | None:
    """A message naming every option whose value differs between ranks, with each rank's value; None when all agree.

    ``gathered`` holds one :func:`describe_options` text per rank, indexed by rank (every rank described the
    same options, in the same order).
    """
    tables = [dict(line.split("=", 1) for line in text.split("\n")) for text in gathered]
    differing = []
    for name in tables[0]:
        values = [table.get(name, "(not given)") for table in tables]
        if len(set(values)) > 1:
            groups: dict[str, list[int]] = {}
            for rank, value in enumerate(values):
                groups.setdefault(value, []).append(rank)
            per_value = ", ".join(f"{_ranks(ranks)}: {value}" for value, ranks in groups.items())
            differing.append(f"{name} ({per_value})")
    if not differing:
        return None
    return (
        f"K-FAC options differ between ranks: {'; '.join(differing)}. "
        "Every rank must construct KFACPreconditioner with the same options"
    )


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if len(ranks) > 4:
        return f"{len(ranks)} ranks ({ranks[0]}, {ranks[1]}, ...)"
    return f"ranks {', '.join(map(str, ranks))}"
