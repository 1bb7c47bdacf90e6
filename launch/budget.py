"""The budget guard: what a sweep may cost (nodes x time limit for each point), shown before anything is
submitted, and refused above budget.max_node_hours, so a typo in nodes= cannot burn a month of an allocation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gpt.errors import ConfigError, UserError


class Billable(Protocol):
    """What a submitting backend's resources say about their cost."""

    nodes: int
    gpus_per_node: int
    time_min: int
    node_hours: float
    gpu_hours: float


@dataclass(frozen=True)
class PointCost:
    label: str  # the sweep point, e.g. "nodes=4"
    resources: Billable

    @property
    def node_hours(self) -> float:
        return self.resources.node_hours

    @property
    def gpu_hours(self) -> float:
        return self.resources.gpu_hours


def check_limit(limit: object) -> float | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
        raise ConfigError("budget.max_node_hours", limit, "a positive number of node-hours, or null for no limit")
    return float(limit)


def table(costs: list[PointCost], limit: float | None) -> str:
    """The cost of every point and of the whole sweep, as the launcher prints it before submitting."""
    label_width = max([len("sweep point"), *(len(c.label) for c in costs)])
    head = f"{'sweep point':<{label_width}}  nodes  GPUs/node  time limit  node-hours  GPU-hours"
    lines = [head]
    for c in costs:
        r = c.resources
        lines.append(f"{c.label:<{label_width}}  {r.nodes:>5}  {r.gpus_per_node:>9}  {r.time_min:>6} min  "
                     f"{c.node_hours:>10.2f}  {c.gpu_hours:>9.2f}")
    node_h, gpu_h = total(costs)
    limit_text = "no limit" if limit is None else f"limit budget.max_node_hours={limit:g}"
    lines.append(f"{'total':<{label_width}}  {sum(c.resources.nodes for c in costs):>5}  {'':>9}  {'':>10}  "
                 f"{node_h:>10.2f}  {gpu_h:>9.2f}  ({limit_text})")
    return "\n".join(lines)


def total(costs: list[PointCost]) -> tuple[float, float]:
    return sum(c.node_hours for c in costs), sum(c.gpu_hours for c in costs)


def check_budget(costs: list[PointCost], limit: float | None) -> None:
    node_h, gpu_h = total(costs)
    if limit is not None and node_h > limit + 1e-9:
        biggest = max(costs, key=lambda c: c.node_hours)
        raise UserError(
            f"this sweep may use {node_h:.2f} node-hours ({gpu_h:.2f} GPU-hours): {len(costs)} job(s), nodes x "
            f"cluster.time_min each (the largest, {biggest.label}, {biggest.node_hours:.2f}), above "
            f"budget.max_node_hours={limit:g}. Lower nodes= or cluster.time_min, or raise the limit: "
            f"budget.max_node_hours={_round_up(node_h)}")


def _round_up(x: float) -> int:
    return int(x) + 1 if x != int(x) else int(x)
