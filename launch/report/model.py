"""The report's data model: what a report holds, and the `report:` config block."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.stragglers import StragglerConfig
from launch.report.compare import SCALING_KEYS, CompareRow
from launch.report.perf_model import FittedModel, Network, Shape
from launch.report.points import Point
from launch.report.rows import Row

PREDICT_NODES = (8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class ReportConfig:
    """The proposed `report:` config block (read from the smallest point's config.yaml when present)."""

    skip_windows: int = 1
    predict_nodes: tuple[int, ...] = PREDICT_NODES
    network: Network = field(default_factory=Network)

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any] | None) -> ReportConfig:
        cfg = dict(cfg or {})
        out = cls()
        if cfg.get("skip_windows") is not None:
            out = cls(int(cfg["skip_windows"]), out.predict_nodes, out.network)
        if cfg.get("predict_nodes"):
            out = cls(out.skip_windows, tuple(int(n) for n in cfg["predict_nodes"]), out.network)
        if cfg.get("network"):
            out = cls(out.skip_windows, out.predict_nodes, Network.from_cfg(cfg["network"]))
        return out


@dataclass
class Report:
    root: Path
    points: list[Point]
    rows: list[Row]
    config: ReportConfig
    straggler_config: StragglerConfig
    keys: list[str]                  # the keys that vary between points
    scaling: bool                    # node or rank counts vary (or nothing else does): a scaling report
    compare: list[CompareRow]        # other keys vary: the points ranked by validation loss (else empty)
    mode: str = "single point"
    reference: Row | None = None
    model: FittedModel | None = None
    shapes: list[Shape] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)  # weak rows, then strong ones when measured

    @property
    def compared_keys(self) -> list[str]:
        return [k for k in self.keys if k not in SCALING_KEYS]
