"""The launcher's config: the run's (gpt.config.schema.RunConfig) with the sections only the launcher and its
backends read, `cluster` (which backend runs the ranks, and what a job asks the scheduler for) and `budget` (what a
sweep may cost). It is the schema Hydra composes configs/ onto, and what every launcher-side process reads from a
run folder's config.yaml: the login node's commands, the task wrappers, srun's launcher and the ranks' own entry
point (which hand the trainer a RunConfig, as this is one). Torch-free."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.config import schema
from gpt.config.schema import RunConfig
from launch.backends.cluster_config import BudgetConfig, ClusterConfig


@dataclass(frozen=True, kw_only=True)
class LaunchConfig(RunConfig):
    cluster: ClusterConfig
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def keys_read(self) -> dict[str, tuple[str, ...]]:
        return {**super().keys_read(), "cluster": self.cluster.keys_read}

    def with_cluster(self, **changes: Any) -> LaunchConfig:
        """This run with cluster keys a backend resolved (srun's auto shape, Slurm's cpus_per_task), checked."""
        cluster = dataclasses.replace(self.cluster, **changes)
        cluster.validate()
        return dataclasses.replace(self, cluster=cluster)


def parse(cfg: Any) -> LaunchConfig:
    """The typed tree of what Hydra composed, checked."""
    return schema.run_config(cfg, LaunchConfig)


def load(path: Path) -> LaunchConfig:
    """A run folder's config.yaml (gpt.config.schema.load: read once per process while the file stays the same)."""
    return schema.load(path, LaunchConfig)


def register() -> None:
    schema.register(LaunchConfig)


def valid_for(path: str) -> str:
    return schema.valid_for(path, LaunchConfig)
