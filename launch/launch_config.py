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
    # the run's node count, the one key for it (sweep it with -m nodes=1,2,4); cluster=srun: auto, the allocation's
    # (SLURM_JOB_NUM_NODES)
    nodes: int | str = 1

    def validate(self) -> None:
        super().validate()
        self.cluster.check_count("nodes", self.nodes)

    def keys_read(self) -> dict[str, tuple[str, ...]]:
        return {**super().keys_read(), "cluster": self.cluster.keys_read}

    def with_cluster(self, nodes: int | None = None, **changes: Any) -> LaunchConfig:
        """This run with the shape and cluster keys a backend resolved (srun's auto shape, Slurm's cpus_per_task),
        checked."""
        cluster = dataclasses.replace(self.cluster, **changes)
        cluster.validate()
        run = dataclasses.replace(self, cluster=cluster, nodes=self.nodes if nodes is None else nodes)
        cluster.check_count("nodes", run.nodes)
        return run

    @classmethod
    def moved_in_place(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """A config.yaml saved before `cluster.nodes` was `nodes`: the cluster's count is the resolved one (srun's
        auto), so it wins."""
        saved = super().moved_in_place(saved)
        if isinstance(saved.get("cluster"), dict) and "nodes" in saved["cluster"]:
            saved["nodes"] = saved["cluster"].pop("nodes")
        return saved


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
