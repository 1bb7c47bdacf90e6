"""Parallel strategies, one per module, chosen by the config's `strategy.name`."""
from __future__ import annotations

import importlib
from typing import Any

import torch

from gpt.distributed import DistEnv
from gpt.errors import ConfigError
from gpt.parallel.base import Strategy

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


def build_strategy(cfg: Any, env: DistEnv, device: torch.device, precision: str) -> Strategy:
    return strategy_class(cfg.name)(cfg, env, device, precision)
