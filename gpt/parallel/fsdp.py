"""FSDP2: every parameter sharded over the data-parallel ranks (`fully_shard` on a DeviceMesh).

Each transformer layer is its own unit: its parameters are all-gathered just before its forward and backward and
freed after, its gradients reduce-scattered so each rank keeps the shard it owns. Mixed precision follows
train.precision through a MixedPrecisionPolicy (parameters cast to bf16/fp16 for compute, gradients reduced in
train.reduce_dtype, fp32 by default), not autocast. Option: parameters and optimizer on the CPU (activation
checkpointing is train.activation_checkpointing, set on the blocks before any strategy wraps them).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor.parallel import loss_parallel

from gpt.config.strategy import StrategyConfig
from gpt.parallel.base import DTYPES, Strategy, StrategySettings, local_part, on_device
from gpt.parallel.mesh import build_mesh, timed
from gpt.parallel.tensor import apply_tensor_parallel
from gpt.train.optim import build_adamw

def mixed_precision(precision: str, reduce_dtype: str = "fp32") -> MixedPrecisionPolicy:
    """FSDP2's policy: parameters gathered in the compute precision (none under fp32), gradients reduced in
    train.reduce_dtype (fp32 unless bf16 is asked for: under bf16 compute FSDP would otherwise reduce in bf16)."""
    param = DTYPES[precision] if precision != "fp32" else None
    reduce = DTYPES[reduce_dtype] if param is not None or reduce_dtype != "fp32" else None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def shard(model: nn.Module, mesh: DeviceMesh, precision: str, cfg: StrategyConfig,
          reduce_dtype: str = "fp32") -> nn.Module:
    """fully_shard each transformer layer of `model` (a GPT or a pipeline stage of one), then the rest."""
    kwargs = {"mesh": mesh, "mp_policy": mixed_precision(precision, reduce_dtype),
              "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()}
    for block in model.layers.values():
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    # The root keeps embeddings, final norm and head; it stays gathered after forward (backward needs it at once).
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


class FSDP(Strategy):
    """FSDP2 on the layout's data-parallel axes: dp_shard alone (FSDP), or dp_replicate x dp_shard (HSDP: shards
    inside a group of dp_shard ranks, the groups replicas of each other); with tp > 1 the model is first split
    by tensor parallelism on the tp axis (gpt.parallel.tensor) and each tp rank's part is then sharded."""

    def __init__(self, cfg, env, device, precision, dims, settings=StrategySettings()):
        super().__init__(cfg, env, device, precision, dims, settings)
        self.mesh: DeviceMesh | None = None
        self.dp_mesh: DeviceMesh | None = None  # the data-parallel ranks, flattened to one axis

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank() if self.dp_mesh is not None else self.env.rank

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.dp_mesh.get_group() if self.dp_mesh is not None else None

    def describe(self) -> str:
        options = [f"{self.precision} compute" if self.precision != "fp32" else "fp32"]
        options += ["cpu offload"] if self.cfg.cpu_offload else []
        options += [f"gradients reduced in {self.reduce_dtype}"] if self.reduce_dtype != "fp32" else []
        options += ["float8 weights gathered in float8"] if self.fp8_all_gather else []
        d = self.dims
        kind = "HSDP" if d.dp_replicate > 1 else "FSDP2"
        shards = f"dp_shard={d.dp_shard}"
        if d.dp_replicate > 1:
            shards = f"dp_replicate={d.dp_replicate} x {shards}"
        what = f"{kind} (fully_shard), parameters sharded over mesh {shards}"
        if d.tp > 1:
            what += f", tensor parallel over tp={d.tp}" + (" with sequence parallel" if d.sequence_parallel else "")
        return f"{what}; {', '.join(options)}"

    def setup(self, model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> None:
        on_device(model, self.device)
        d = self.dims
        self.mesh = build_mesh(self.device, dp_replicate=d.dp_replicate, dp_shard=d.dp_shard, tp=d.tp)
        if d.tp > 1:
            apply_tensor_parallel(model, self.mesh["tp"], d.sequence_parallel)
        if self.compile:  # after tensor parallelism, before sharding (per block: the traits say so)
            self.compile.apply(model)
        self.dp_mesh = timed(self.mesh["dp_replicate", "dp_shard"]._flatten("dp"))
        shard_mesh = self.mesh["dp_replicate", "dp_shard"] if d.dp_replicate > 1 else self.mesh["dp_shard"]
        self.model = shard(model, shard_mesh, self.precision, self.cfg, self.reduce_dtype)
        self.optimizer = build_adamw(self.model, lr, weight_decay, betas, self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts parameters instead

    def optimizer_step(self, skipped: torch.Tensor) -> None:
        super().optimizer_step(skipped)
        self.precompute_fp8_scales()

    def load_state(self, folder: Path) -> None:
        super().load_state(folder)
        self.precompute_fp8_scales()  # the loaded weights were copied into the tensors that keep the old scales

    def precompute_fp8_scales(self) -> None:
        if self.fp8_all_gather:  # the next all-gather's float8 scales, from every weight's amax in one all-reduce
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            precompute_float8_dynamic_scale_for_fsdp(self.model)

    def loss_context(self) -> contextlib.AbstractContextManager:
        return loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext()

    def sync_gradients(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()

    def local_gradients(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        # Parameters tensor parallelism leaves whole (norms) are sharded over dp only: every tp rank holds them.
        for name, p in self.unwrapped.named_parameters():
            if p.grad is not None:
                yield name, *local_part(p.grad, self.dp_size, self.env.world_size // p.grad.device_mesh.size())

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """The norm from each rank's local parts (DTensors on the dp and on the dp x tp mesh do not mix in
        get_total_norm), each counted once, then clip with it."""
        if self.dims.tp == 1:
            return super().clip_gradients(max_norm)
        square = torch.zeros((), device=self.device)
        for _, grad, copies in self.local_gradients():
            square += grad.float().pow(2).sum() / copies
        dist.all_reduce(square)
        norm = square.sqrt()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for p in self.model.parameters() if p.grad is not None],
                                                 max_norm, norm, foreach=False)  # one mesh per call
        return norm
