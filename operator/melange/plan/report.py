"""Plans as data (the JSON/YAML shape shared by the CLI and the custom resource's status) and as a table."""

from __future__ import annotations

from typing import Any

from melange.plan.result import Plan


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def assignment_to_list(plan: Plan) -> list[dict[str, Any]]:
    """Per bucket with traffic: its token ranges, its rate and the share sent to each GPU type."""
    return [
        {
            "inputTokens": list(bucket.input_tokens),
            "outputTokens": list(bucket.output_tokens),
            "rate": _round(bucket.rate),
            "shares": [
                {"gpu": s.gpu, "slices": s.slices, "fraction": _round(s.fraction)}
                for s in bucket.shares
            ],
        }
        for bucket in plan.assignment
    ]


def plan_to_dict(plan: Plan, include_timing: bool = True) -> dict[str, Any]:
    """The plan as plain data; with `include_timing=False` it depends on the input alone."""
    data: dict[str, Any] = {
        "status": plan.status,
        "reason": plan.reason,
        "totalRate": _round(plan.total_rate),
        "costPerHour": _round(plan.cost_per_hour),
        "lowerBound": _round(plan.lower_bound),
        "gap": _round(plan.gap),
        "gpus": [
            {
                "name": g.name,
                "replicas": g.replicas,
                "costPerHour": _round(g.cost_per_hour),
                "utilization": _round(g.utilization, 4),
            }
            for g in plan.gpus
        ],
        "assignment": assignment_to_list(plan),
        "baselines": [
            {
                "gpu": b.gpu,
                "replicas": b.replicas,
                "costPerHour": _round(b.cost_per_hour),
                **({"reason": b.reason} if b.reason else {}),
            }
            for b in plan.baselines
        ],
        "saving": _round(plan.saving, 4),
        "method": plan.method,
    }
    if include_timing:
        data["solveSeconds"] = _round(plan.solve_seconds, 4)
    return data


def format_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    line = [
        h.ljust(w) if k == 0 else h.rjust(w)
        for k, (h, w) in enumerate(zip(header, widths, strict=True))
    ]
    out = ["  ".join(line).rstrip()]
    for row in rows:
        cells = [
            c.ljust(w) if k == 0 else c.rjust(w)
            for k, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def render_table(plan: Plan) -> str:
    """A human summary: replicas and cost per GPU type, the total, the bound and the saving."""
    if not plan.solved:
        return f"status: {plan.status}\nreason: {plan.reason}\n"
    rows = [
        [g.name, str(g.replicas), f"{g.cost_per_hour:.2f}", f"{g.utilization:.0%}"]
        for g in plan.gpus
    ]
    total_replicas = sum(g.replicas for g in plan.gpus)
    rows.append(["total", str(total_replicas), f"{plan.cost_per_hour or 0:.2f}", ""])
    lines = format_table(["GPU", "REPLICAS", "COST/H", "UTILIZATION"], rows)
    lines.append("")
    verdict = "proven" if plan.status == "Optimal" else plan.reason
    lines.append(
        f"status:       {plan.status} ({verdict}; {plan.method}, {plan.solve_seconds:.3f} s)"
    )
    lines.append(f"request rate: {plan.total_rate:.4g} req/s")
    gap = plan.gap or 0.0
    lines.append(f"lower bound:  {plan.lower_bound or 0:.2f}/h (no plan costs less; gap {gap:.1%})")
    best = plan.best_baseline
    if best is not None and plan.saving is not None:
        lines.append(
            f"best single type: {best.gpu} x{best.replicas} at {best.cost_per_hour or 0:.2f}/h; "
            f"saving {plan.saving:.1%}"
        )
    else:
        lines.append("best single type: none can serve the whole workload alone")
    return "\n".join(lines) + "\n"
