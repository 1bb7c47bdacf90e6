"""FSDP2: every parameter sharded over the data-parallel ranks (`fully_shard` on a DeviceMesh).

Each transformer layer is its own unit: its parameters are all-gathered just before its forward and backward and
freed after, its gradients reduce-scattered so each rank keeps the shard it owns. Mixed precision follows
train.precision through a MixedPrecisionPolicy (parameters cast to bf16/fp16 for compute, gradients reduced in
fp32), not autocast. Options: activation checkpointing per layer, parameters and optimizer on the CPU.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from gpt.errors import ConfigError
from gpt.parallel.base import DTYPES, Strategy, check_keys, planned_device
from gpt.parallel.mesh import build_mesh, describe_mesh
from gpt.optim import build_adamw

KEYS = ("reshard_after_forward", "activation_checkpointing", "cpu_offload")


def check_fsdp_options(cfg: Any, train: Any, prefix: str = "strategy") -> None:
    """Options a device cannot run: CPU offload moves parameters off a GPU, so it needs one."""
    if cfg.get("cpu_offload", False) and train is not None and planned_device(train) != "cuda":
        raise ConfigError(f"{prefix}.cpu_offload", True, "false on a CPU run (offloading moves parameters from a GPU "
                          "to the CPU); set train.device=cuda on a GPU machine to use it")


def checkpoint_activations(block: nn.Module) -> None:
    """Recompute the block's activations in backward instead of keeping them (parameter names unchanged)."""
    forward = block.forward

    @functools.wraps(forward)
    def recomputed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed


def shard(model: nn.Module, mesh: DeviceMesh, precision: str, cfg: Any) -> nn.Module:
    """fully_shard each transformer layer of `model` (a GPT or a pipeline stage of one), then the rest."""
    mp = None
    if precision != "fp32":
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh, "mp_policy": mp or MixedPrecisionPolicy(),
              "offload_policy": CPUOffloadPolicy() if cfg.get("cpu_offload", False) else OffloadPolicy()}
    reshard = cfg.get("reshard_after_forward", True)
    for block in model.layers.values():
        if cfg.get("activation_checkpointing", False):
            checkpoint_activations(block)
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    # The root keeps embeddings, final norm and head; it stays gathered after forward (backward needs it at once).
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


class FSDP(Strategy):
    name = "fsdp"

    def __init__(self, cfg, env, device, precision):
        super().__init__(cfg, env, device, precision)
        self.mesh: DeviceMesh | None = None

    @classmethod
    def data_parallel_size(cls, cfg, model_cfg, world_size: int, train=None) -> int:
        check_keys(cfg, KEYS)
        check_fsdp_options(cfg, train)
        return world_size

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp") if self.mesh is not None else self.env.rank

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group("dp") if self.mesh is not None else None

    def describe(self) -> str:
        options = [f"{self.precision} compute" if self.precision != "fp32" else "fp32"]
        options += [key.replace("_", " ") for key in ("activation_checkpointing", "cpu_offload") if self.cfg.get(key)]
        mesh = describe_mesh(self.mesh) if self.mesh is not None else f"dp={self.dp_size}"
        return f"FSDP2 (fully_shard), parameters sharded over mesh {mesh}; {', '.join(options)}"

    def setup(self, model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> None:
        model.to(self.device)
        self.mesh = build_mesh(self.device, dp=self.env.world_size)
        self.model = shard(model, self.mesh, self.precision, self.cfg)
        self.optimizer = build_adamw(self.model, lr, weight_decay, betas, self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts parameters instead

    def sync_gradients(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()
