"""The tracking section: an experiment tracker that mirrors rank 0's metrics (gpt.train.tracking). Off by default;
wandb and mlflow are optional extras (`pip install -e '.[tracking]'`). Torch-free."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from gpt.config.credentials import check_uri
from gpt.errors import ConfigError

KINDS = ("none", "wandb", "mlflow")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class TrackingConfig:
    kind: str = "none"  # none | wandb | mlflow: configs/tracking/<kind>.yaml
    project: str = "gptlaunch"  # the W&B project, or the MLflow experiment
    # wandb: offline writes under RUN_DIR/wandb and needs no network (`wandb sync RUN_DIR/wandb/offline-run-*`)
    mode: str = "offline"
    # mlflow: where runs go; null: a file store shared by every run under runs/ (runs/mlruns)
    uri: str | None = None

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("tracking.kind", self.kind, " | ".join(KINDS))
        if self.kind != "none" and importlib.util.find_spec(self.kind) is None:
            raise ConfigError("tracking.kind", self.kind, f"a tracker that is installed: pip install -e '.[tracking]' "
                                                          f"adds {self.kind}")
        if self.mode not in WANDB_MODES:
            raise ConfigError("tracking.mode", self.mode, " | ".join(WANDB_MODES))
        if not self.project:
            raise ConfigError("tracking.project", self.project, "a non-empty project or experiment name")
        check_uri("tracking.uri", self.uri)
