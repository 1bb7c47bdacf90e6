"""Validate a composed config and turn it into a plan, before any process starts or any job is submitted."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from gpt.config import ModelConfig
from gpt.data import DataConfig, check_vocab, ensure_prepared
from gpt.errors import ConfigError
from gpt.parallel import strategy_class
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


def make_plan(cfg: DictConfig, run_dir: Path) -> Plan:
    """Check everything a user can get wrong, prepare the data, and write the resolved config to the run folder."""
    nodes, per_node = _positive(cfg, "cluster.nodes"), _positive(cfg, "cluster.tasks_per_node")
    model = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    train = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))
    strategy = strategy_class(cfg.strategy.name)
    dp_size = strategy.data_parallel_size(cfg.strategy, model, nodes * per_node, train)
    train.micro_batches(dp_size)
    try:
        StragglerConfig.from_metrics_cfg(cfg.get("metrics"))
    except ValueError as e:
        raise ConfigError("metrics", OmegaConf.to_container(cfg.metrics), str(e)) from None

    cfg = cfg.copy()
    cfg.data.text_path = to_absolute_path(cfg.data.text_path)
    cfg.data.dir = to_absolute_path(cfg.data.dir)
    data = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    check_vocab(model.vocab_size, ensure_prepared(data))

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return Plan(run_dir, nodes, per_node)
