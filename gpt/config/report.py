"""The report section: how `python -m launch.report` (and a sweep's end) reads the measured points and which
network its performance model assumes. Read from the smallest point's config.yaml, so a report rebuilt offline
uses the settings of its run."""
from __future__ import annotations

from dataclasses import dataclass, field

from gpt.errors import ConfigError

PREDICT_NODES = (8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Network:
    intra_node_GBps: float = 900.0      # NVLink 4 on H100 SXM, per GPU
    inter_node_GBps: float = 50.0       # InfiniBand NDR 400 Gb/s, one port per GPU
    intra_node_latency_us: float = 5.0
    inter_node_latency_us: float = 10.0

    def validate(self) -> None:
        for key in ("intra_node_GBps", "inter_node_GBps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"report.network.{key}", getattr(self, key), "a positive bandwidth in GB/s")
        for key in ("intra_node_latency_us", "inter_node_latency_us"):
            if getattr(self, key) < 0:
                raise ConfigError(f"report.network.{key}", getattr(self, key), "a latency >= 0 in microseconds")


@dataclass(frozen=True)
class ReportConfig:
    skip_windows: int = 1  # log windows of each rank left out of the steady state
    predict_nodes: tuple[int, ...] = PREDICT_NODES  # node counts the performance model predicts
    network: Network = field(default_factory=Network)  # the network the model assumes

    def validate(self) -> None:
        if self.skip_windows < 0:
            raise ConfigError("report.skip_windows", self.skip_windows, "0 or more log windows")
        if not self.predict_nodes or min(self.predict_nodes) < 1:
            raise ConfigError("report.predict_nodes", list(self.predict_nodes), "a list of positive node counts")
