"""The budget guard: what a sweep may cost, shown before anything is submitted, and refused above
budget.max_node_hours, so a typo in nodes= cannot burn a month of an allocation. A job that requeues itself may
run up to preemption.max_restarts + 1 times: the limit applies to that worst case unless budget.applies_to=expected.
The `budget` section itself is launch.backends.cluster_config.BudgetConfig."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gpt.errors import UserError


class Billable(Protocol):
    """What a submitting backend's resources say about their cost."""

    nodes: int
    node_gpus: int
    time_min: int
    node_hours: float
    gpu_hours: float


@dataclass(frozen=True)
class PointCost:
    label: str  # the sweep point, e.g. "nodes=4"
    resources: Billable
    restarts: int = 0  # times the job may run again (preemption.max_restarts when it requeues itself)

    @property
    def node_hours(self) -> float:
        """Expected: one run to the time limit."""
        return self.resources.node_hours

    @property
    def worst_node_hours(self) -> float:
        """Every restart runs to the time limit too."""
        return self.resources.node_hours * (self.restarts + 1)

    @property
    def gpu_hours(self) -> float:
        return self.resources.gpu_hours * (self.restarts + 1)


# A larger sweep's table has one row per kind of job (its points counted), not one per point.
MAX_ROWS = 20


def table(costs: list[PointCost], limit: float | None, applies_to: str = "worst") -> str:
    """The cost of every point and of the whole sweep, as the launcher prints it before submitting: expected
    (each job runs once, to its time limit) and worst (each of its restarts does too)."""
    rows = _rows(costs)
    width = max([len("sweep point"), *(len(label) for label, _ in rows)])
    lines = [f"{'sweep point':<{width}}  nodes  GPUs/node  time limit  restarts  node-hours  worst case  "
             "GPU-hours (worst)"]
    for label, group in rows:
        r, c = group[0].resources, group[0]
        expected, worst, gpu_h = total(group)
        lines.append(f"{label:<{width}}  {r.nodes:>5}  {r.node_gpus:>9}  {r.time_min:>6} min  {c.restarts:>8}  "
                     f"{expected:>10.2f}  {worst:>10.2f}  {gpu_h:>17.2f}")
    expected, worst, gpu_h = total(costs)
    limit_text = "no limit" if limit is None else f"limit budget.max_node_hours={limit:g} on the {applies_to} case"
    lines.append(f"{'total':<{width}}  {sum(c.resources.nodes for c in costs):>5}  {'':>9}  {'':>10}  {'':>8}  "
                 f"{expected:>10.2f}  {worst:>10.2f}  {gpu_h:>17.2f}  ({limit_text})")
    spares = sum(getattr(c.resources, "spare_node_hours", 0.0) * (c.restarts + 1) for c in costs)
    if spares:
        lines.append(f"(of the worst case, {spares:.2f} node-hours are spare nodes, cluster.spare_nodes: allocated "
                     "idle to replace a failed node without a requeue)")
    if len(rows) < len(costs):
        lines.append(f"({len(costs)} points in {len(rows)} rows: the points of a row ask for the same resources, "
                     "and its hours are theirs together)")
    return "\n".join(lines)


def _rows(costs: list[PointCost]) -> list[tuple[str, list[PointCost]]]:
    """(label, points) per row: one point each, or for a large sweep the points of each kind of job."""
    if len(costs) <= MAX_ROWS:
        return [(c.label, [c]) for c in costs]
    kinds: dict[tuple, list[PointCost]] = {}
    for c in costs:
        r = c.resources
        kinds.setdefault((r.nodes, r.node_gpus, r.time_min, c.restarts), []).append(c)
    return [(f"{len(g)} x {g[0].label}" + (" ..." if len(g) > 1 else ""), g) for g in kinds.values()]


def total(costs: list[PointCost]) -> tuple[float, float, float]:
    """Expected node-hours, worst-case node-hours, worst-case GPU-hours."""
    return (sum(c.node_hours for c in costs), sum(c.worst_node_hours for c in costs),
            sum(c.gpu_hours for c in costs))


def check_budget(costs: list[PointCost], limit: float | None, applies_to: str = "worst") -> None:
    expected, worst, gpu_h = total(costs)
    spent = worst if applies_to == "worst" else expected
    if limit is not None and spent > limit + 1e-9:
        per_point = (lambda c: c.worst_node_hours) if applies_to == "worst" else (lambda c: c.node_hours)
        biggest = max(costs, key=per_point)
        how = ("nodes x cluster.time_min x cluster.chain x (preemption.max_restarts + 1) each"
               if applies_to == "worst" else "nodes x cluster.time_min x cluster.chain each")
        raise UserError(
            f"this sweep may use {spent:.2f} node-hours in the {applies_to} case ({expected:.2f} expected, "
            f"{worst:.2f} worst, {gpu_h:.2f} GPU-hours worst): {len(costs)} job(s), {how} (the largest, "
            f"{biggest.label}, {per_point(biggest):.2f}), above budget.max_node_hours={limit:g}. Lower nodes=, "
            f"cluster.time_min, cluster.chain or preemption.max_restarts, limit the expected cost "
            f"(budget.applies_to=expected), or raise the limit: budget.max_node_hours={_round_up(spent)}")


def _round_up(x: float) -> int:
    return int(x) + 1 if x != int(x) else int(x)
