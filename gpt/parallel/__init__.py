"""Parallel strategies, one per module, chosen by the config's `strategy.name`; each is a preset of the layout
(`parallel.*`, gpt.parallel.layout) that says how the data-parallel ranks work and which axes it runs."""
from __future__ import annotations

import importlib
from typing import Any

import torch

from gpt.distributed import DistEnv
from gpt.errors import ConfigError
from gpt.parallel.base import Strategy
from gpt.parallel.layout import ParallelDims, check_dims

# name -> "module:Class"; imported on demand so an optional backend (DeepSpeed) costs nothing when unused.
STRATEGIES = {
    "single": "gpt.parallel.base:Strategy",
    "ddp": "gpt.parallel.ddp:DDP",
    "fsdp": "gpt.parallel.fsdp:FSDP",
    "zero1": "gpt.parallel.zero1:Zero1",
    "deepspeed": "gpt.parallel.deepspeed:DeepSpeed",
    "pipeline": "gpt.parallel.pipeline:Pipeline",
}


def strategy_class(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ConfigError("strategy", name, f"one of {', '.join(STRATEGIES)}")
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def plan_layout(cfg: Any, model_cfg: Any, world_size: int, ranks_per_node: int, train: Any = None) -> ParallelDims:
    """The run's layout, checked against the strategy, the model and the nodes (a ConfigError if it cannot run).
    cfg is the whole config (its `strategy` and `parallel` sections)."""
    cls = strategy_class(cfg.strategy.name)
    parallel = cfg.get("parallel") or {}
    tp = parallel.get("tp", 1)
    # The preset's own checks (stages, micro-batches) count the ranks of one tensor-parallel slice.
    slice_ranks = world_size // tp if isinstance(tp, int) and tp > 0 and world_size % tp == 0 else world_size
    cls.data_parallel_size(cfg.strategy, model_cfg, slice_ranks, train)
    dims = cls.traits().layout(cfg.strategy, parallel, world_size)
    check_dims(dims, parallel, model_cfg, ranks_per_node)
    return dims


def build_strategy(cfg: Any, model_cfg: Any, env: DistEnv, device: torch.device, precision: str) -> Strategy:
    dims = plan_layout(cfg, model_cfg, env.world_size, env.local_world_size)
    return strategy_class(cfg.strategy.name)(cfg.strategy, env, device, precision, dims)
