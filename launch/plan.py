"""Validate a composed config and turn it into a plan, before any process starts or any job is submitted."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from gpt.config import ModelConfig
from gpt.data import DataConfig, check_vocab, ensure_prepared
from gpt.errors import ConfigError
from gpt.run_config import check_run_sections
from gpt.parallel import plan_layout
from gpt.stragglers import StragglerConfig
from gpt.train_config import TrainConfig


@dataclass(frozen=True)
class Plan:
    run_dir: Path
    nodes: int
    tasks_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def _positive(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(key, value, "a positive integer")
    return value


def planned_device(cfg: DictConfig) -> str:
    """The device the ranks will compute on: train.device, or for `auto` what the run asks for. A Slurm job has
    the GPUs of cluster.gpus_per_node whatever this login node has."""
    requested = OmegaConf.select(cfg, "train.device", default="auto") or "auto"
    if requested != "auto":
        return requested
    backend = cfg.cluster.get("name")
    if backend == "slurm":
        return "cuda" if (cfg.cluster.get("gpus_per_node") or 0) > 0 else "cpu"
    if backend == "srun":
        from launch.backends.srun import gpus_on_node

        return "cuda" if gpus_on_node(dict(os.environ)) else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_local_gpus(cfg: DictConfig, device: str, world_size: int) -> None:
    """Local ranks share this machine's GPUs one each: two ranks on one GPU make NCCL fail ("Duplicate GPU")."""
    if cfg.cluster.get("name") != "local" or device != "cuda":
        return
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise ConfigError("train.device", "cuda", "cpu or auto: this machine has no CUDA GPU for the local ranks")
    if world_size > gpus:
        raise ConfigError("cluster.tasks_per_node", cfg.cluster.tasks_per_node,
                          f"at most {gpus} rank(s) in all (nodes x tasks_per_node is {world_size}): this machine "
                          f"has {gpus} GPU(s) and each rank needs its own; or train.device=cpu")


def make_plan(cfg: DictConfig, run_dir: Path) -> Plan:
    """Check everything a user can get wrong, prepare the data, and write the resolved config to the run folder."""
    nodes, per_node = _positive(cfg, "cluster.nodes"), _positive(cfg, "cluster.tasks_per_node")
    model = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    train = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))
    device = planned_device(cfg)
    check_local_gpus(cfg, device, nodes * per_node)
    train = dataclasses.replace(train, device=device)  # strategies check their options against it
    dims = plan_layout(cfg, model, nodes * per_node, per_node, train)
    train.micro_batches(dims.dp)
    StragglerConfig.from_metrics_cfg(cfg.get("metrics"))
    check_run_sections(OmegaConf.to_container(cfg, resolve=True))

    cfg = cfg.copy()
    cfg.data.text_path = to_absolute_path(cfg.data.text_path)
    cfg.data.dir = to_absolute_path(cfg.data.dir)
    data = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    check_vocab(model.vocab_size, ensure_prepared(data))

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return Plan(run_dir, nodes, per_node)
