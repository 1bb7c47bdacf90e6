"""What a sweep varies, and the comparison of its points on what the user swept for (validation loss).

The keys that vary come from Hydra's saved overrides of each point (`.hydra/overrides.yaml`) when every point has
them, else from the difference of the points' resolved `config.yaml`. Node and rank counts are scaling keys: a
sweep over them is about scaling; a sweep over anything else (`-m train.lr=1e-3,3e-4`) is a comparison.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from launch.report.points import PointResult

# (cluster.nodes: the overrides of a sweep run before the node count was one key, `nodes`)
SCALING_KEYS = {"nodes", "cluster.nodes", "cluster.tasks_per_node", "cluster.gpus_per_node"}
# Keys that follow from others (the run's name from model and strategy) or do not change what is trained.
DERIVED_KEYS = {"name", "train.progress"}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: repr(d)}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return {k.removesuffix("."): v for k, v in out.items()}


def _overrides(point: PointResult) -> dict[str, str]:
    pairs = (o.lstrip("+~").split("=", 1) for o in point.overrides or [])
    return {p[0]: p[1] for p in pairs if len(p) == 2}


def _differing(flat: Sequence[dict[str, Any]]) -> list[str]:
    keys = sorted(set().union(*flat))
    return [k for k in keys if len({f.get(k) for f in flat}) > 1 and k not in DERIVED_KEYS]


def varying_keys(points: Sequence[PointResult]) -> list[str]:
    """The keys whose value differs between points, as the user named them where Hydra saved that."""
    if len(points) < 2:
        return []
    if all(p.overrides is not None for p in points):
        return _differing([_overrides(p) for p in points])
    return _differing([_flatten(p.config) for p in points])


def value_of(point: PointResult, key: str) -> str:
    given = _overrides(point)
    if key in given:
        return given[key]
    node: Any = point.config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return str(node)


def label(point: PointResult, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={value_of(point, k)}" for k in keys) or point.name


@dataclass
class CompareRow:
    point: str
    label: str                  # the swept keys and this point's values
    steps: int                  # last step logged (training or validation)
    final_train_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    best_val_step: int | None
    tokens_per_s: float
    rank: int = 0               # 1 = best
    stopped_early: str = ""     # why the sweep's early stopping ended it (launcher.early_stop)


def compare_rows(points: Sequence[PointResult], keys: Sequence[str], tokens_per_s: Sequence[float]) -> list[CompareRow]:
    """One row per point, ranked by best validation loss (by final training loss where no point validated)."""
    rows = []
    for p, tps in zip(points, tokens_per_s):
        best = min(p.val_loss, key=lambda sv: sv[1]) if p.val_loss else None
        rows.append(CompareRow(
            point=p.name, label=label(p, keys), steps=max((s for s, _ in p.train_loss + p.val_loss), default=0),
            final_train_loss=p.train_loss[-1][1] if p.train_loss else None,
            final_val_loss=p.val_loss[-1][1] if p.val_loss else None,
            best_val_loss=best[1] if best else None, best_val_step=best[0] if best else None, tokens_per_s=tps,
            stopped_early=p.stopped_early))
    by = ranked_by(rows)
    for i, r in enumerate(sorted(rows, key=lambda r: _key(getattr(r, by)))):
        r.rank = i + 1
    return sorted(rows, key=lambda r: r.rank)


def ranked_by(rows: Sequence[CompareRow]) -> str:
    return "best_val_loss" if any(r.best_val_loss is not None for r in rows) else "final_train_loss"


def _key(v: float | None) -> float:
    return math.inf if v is None or math.isnan(v) else v
