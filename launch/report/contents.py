"""The report's data model: what a report holds (its settings are the `report` section, gpt.config.report)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.config.report import ReportConfig
from gpt.config.sections import StragglerConfig
from launch.report.compare import SCALING_KEYS, CompareRow
from launch.report.perf_model import FittedModel, Shape
from launch.report.points import PointResult
from launch.report.rows import Row

@dataclass
class Report:
    root: Path
    points: list[PointResult]
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
