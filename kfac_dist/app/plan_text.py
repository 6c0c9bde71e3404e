"""The text of ``kfac-dist plan``: a :class:`~kfac_dist.planner.PlanReport` as tables in MiB."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kfac_dist import costs
from kfac_dist.app.units import mib
from kfac_dist.planner import STEP_KINDS, PlanReport, steps_per_period, traffic_total

__all__ = ["MAX_RANK_ROWS", "plan_text"]

_LABELS = {kind: kind.replace("_", "-") + " step" for kind in STEP_KINDS}
#: Per-rank rows are printed up to this world size (beyond it, only min/mean/max/total) unless asked for.
MAX_RANK_ROWS = 16


def plan_text(report: PlanReport, per_rank: bool | None = None) -> str:
    """A readable report in MiB; per-rank rows up to :data:`MAX_RANK_ROWS` ranks unless `per_rank` says."""
    o, sizes, s = report.options, report.sizes, report.summary()
    period, counts = steps_per_period(o)
    kinds = [k for k in STEP_KINDS if counts[k]]
    schedule = ", ".join(f"{counts[k]} {_LABELS[k]}{'s' * (counts[k] != 1)}" for k in kinds)
    lines = [
        f"kfac-dist plan: {report.model}, {len(report.layers)} preconditioned layers "
        f"({sum(x.grad_numel for x in report.layers):,} parameters), world size {report.world_size}",
        f"  grad_worker_fraction={report.plan.grad_worker_fraction:.4g} ({report.plan.grad_workers} grad workers per "
        f"layer), assignment={o.assignment}, factor_comm={o.factor_comm}, symmetric_comm={o.symmetric_comm}",
        f"  compute_method={o.compute_method}; bytes per element: factor {sizes.factor}, inverse {sizes.inv}, "
        f"gradient {sizes.grad}; bucket_cap_mb={o.bucket_cap_mb:g}",
        f"  factors every {o.factor_update_steps} steps, decompositions every {o.inv_update_steps} "
        "(an inverse step also updates factors, as step 0)",
        f"  per {period} steps: {schedule}; {len(report.plan.groups())} process groups; "
        f"plan fingerprint {report.plan.fingerprint()}",
        "",
        "Per rank: layers owned, memory (MiB), traffic per step (MiB sent + received), decomposition load / mean",
        *_rank_table(report, kinds, per_rank),
        "",
        "Traffic per rank per step by category (MiB)",
        *_category_table(report, kinds),
        "",
        f"Decomposition load (sum of a^3 + g^3 of owned layers): max {report.load.max:.4g}, "
        f"mean {report.load.mean:.4g}, max/mean {report.load.imbalance:.3f}",
        "",
        "Beside KAISA (factor_comm=allreduce, same placement), per rank:",
    ]
    pairs = [("max memory (MiB)", "memory_max"), ("mean memory (MiB)", "memory_mean")]
    pairs += [("max amortised traffic (MiB/step)", "amortised_max")]
    pairs += [("mean amortised traffic (MiB/step)", "amortised_mean")]
    lines += _table(["", "this plan", "KAISA"], [[k, mib(s[v]), mib(s["kaisa_" + v])] for k, v in pairs])
    return "\n".join(line.rstrip() for line in lines)


def _rank_table(report: PlanReport, kinds: list[str], per_rank: bool | None) -> list[str]:
    head = ["rank", "layers", *costs.MEMORY_CATEGORIES, "memory", *(_LABELS[k] for k in kinds), "amortised"]
    rows = []
    for r in range(report.world_size):
        memory = [float(report.memory[r][c]) for c in costs.MEMORY_CATEGORIES]
        traffic = [traffic_total(report.step_bytes[k][r]) for k in kinds] + [traffic_total(report.amortised[r])]
        load = report.load.per_rank[r] / report.load.mean if report.load.mean else 1.0
        rows.append([len(report.plan.layers_owned_by(r)), *memory, sum(memory), *traffic, load])
    show = per_rank if per_rank is not None else report.world_size <= MAX_RANK_ROWS
    shown = rows if show else []
    names = [str(r) for r in range(len(shown))] + ["min", "mean", "max", "total"]
    body = shown + [[f(col) for col in zip(*rows, strict=True)] for f in (min, _mean, max, sum)]
    formats = [lambda v: f"{v:,.4g}"] + [mib] * (len(head) - 2) + [lambda v: f"{v:.3f}"]
    return _table(
        [*head, "load"],
        [[n] + [f(v) for f, v in zip(formats, row, strict=True)] for n, row in zip(names, body, strict=True)],
    )


def _category_table(report: PlanReport, kinds: list[str]) -> list[str]:
    body = []
    for kind in [*kinds, "amortised"]:
        per_rank: Mapping[int, Mapping[str, Mapping[str, float]]]
        per_rank = report.amortised if kind == "amortised" else report.step_bytes[kind]
        for category in (*costs.CATEGORIES, "all"):
            cats = costs.CATEGORIES if category == "all" else (category,)
            cols = [[sum(t[c][d] for c in cats) for t in per_rank.values()] for d in ("sent", "received")]
            body.append([_LABELS.get(kind, kind), category, *(mib(f(c)) for c in cols for f in (_mean, max))])
    return _table(["step", "category", "sent mean", "sent max", "received mean", "received max"], body)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns (the first one left-aligned)."""
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    return [
        "  ".join(c.ljust(n) if i == 0 else c.rjust(n) for i, (c, n) in enumerate(zip(row, widths, strict=True)))
        for row in [head, *rows]
    ]
