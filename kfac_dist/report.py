"""What the preconditioner did with each module, and counters of numerical fallbacks."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Names of the numerical-fallback counters reported by ``KFACPreconditioner.health()``.
HEALTH_COUNTERS = (
    "nonfinite_factor_skipped",
    "decomposition_retried_float64",
    "decomposition_kept_previous",
    "decomposition_unavailable",
    "nonfinite_gradient",
    "eigenbasis_refreshed",
)


@dataclass
class Report:
    """Which modules are preconditioned, skipped by pattern, unsupported, or registered but never called.

    Attributes:
        preconditioned: names of modules whose gradients K-FAC preconditions.
        skipped: module name -> the ``skip_layers`` pattern that matched it.
        unsupported: module name -> why its trainable parameters are left to the optimizer as they are.
        inactive: registered modules whose hooks have never fired (e.g. called functionally, like
            ``MultiheadAttention.out_proj``); their gradients are left to the optimizer as they are.
    """

    preconditioned: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    inactive: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        """A readable multi-line summary."""
        lines = [f"preconditioned ({len(self.preconditioned)}): {', '.join(self.preconditioned) or '-'}"]
        lines += [f"skipped {name} (pattern {pattern!r})" for name, pattern in self.skipped.items()]
        lines += [f"unsupported {name}: {reason}" for name, reason in self.unsupported.items()]
        lines += [f"inactive {name}: its hooks never fired, gradient left as it is" for name in self.inactive]
        return "\n".join(lines)
