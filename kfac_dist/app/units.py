"""How the application writes sizes: bytes in MiB (run summaries, ``kfac-dist plan``, benchmark reports)."""

from __future__ import annotations

__all__ = ["MIB", "mib"]

#: Bytes in a MiB.
MIB = 2**20


def mib(value: float) -> str:
    """`value` bytes in MiB, two decimals and thousands separators, no unit: ``mib(3 * 2**30) == "3,072.00"``."""
    return f"{value / MIB:,.2f}"
