"""DeepSpeed: the DeepSpeed engine with ZeRO stage 0-3, its ds_config generated from our config.

- Stage 1 splits the optimizer state over the ranks, stage 2 also the gradients, stage 3 also the parameters.
- The optimizer is our torch AdamW object (the same parameter groups as every strategy). A DeepSpeed optimizer
  type would JIT-build fused_adam (about 50 s) and give different numerics.
- Precision: bf16 and fp16 are DeepSpeed's own (the model is cast; fp32 master weights in the optimizer).
  bf16 needs stage >= 1: at stage 0 gradients accumulate in bf16 and training drifts.
- The engine's micro-batch and accumulation steps are set from the batches the trainer hands over.
- Checkpoints: the engine's own save_checkpoint/load_checkpoint under `deepspeed/` (exact resume on the same
  world size), every rank writing its partitions. The run's last save adds the fp32 weights whole as a DCP `model`
  entry, gathered onto rank 0; any other save leaves it out (gathering costs rank 0 4 bytes of host memory per
  parameter, inside a preemption's grace time), and readers put the weights together from the engine's files
  (gpt.checkpoint.engine_weights).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import warnings
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from gpt.checkpoint.engine_weights import FOLDER, TAG
from gpt.checkpoint.safe_load import load_deepspeed_file
from gpt.errors import ConfigError
from gpt.train.divergence import spread_nonfinite
from gpt.train.metrics import layer_grad_norms
from gpt.train.optim import build_adamw
from gpt.train.step_timer import PhaseClock
from gpt.config.strategy import StrategyConfig
from gpt.parallel.base import StepResult, Strategy, StrategySettings, nonfinite
from gpt.parallel.mesh import ensure_process_group

def ds_config(cfg: StrategyConfig, precision: str, grad_clip: float = 0.0, micro_batch: int = 1, grad_accum: int = 1,
              world_size: int = 1, reduce_dtype: str = "fp32") -> dict[str, Any]:
    """The DeepSpeed JSON config for our strategy config; strategy.config entries are merged in last. Gradients are
    reduced in train.reduce_dtype (communication_data_type): the engine's own default is the compute precision."""
    zero: dict[str, Any] = {"stage": cfg.stage, "overlap_comm": cfg.overlap_comm,
                            "reduce_bucket_size": cfg.reduce_bucket_size, "contiguous_gradients": True}
    if zero["stage"] == 3:
        zero["stage3_param_persistence_threshold"] = 0  # shard every parameter, however small
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "communication_data_type": reduce_dtype,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16" and zero["stage"] >= 1:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    for key, value in cfg.config.items():  # an escape hatch: any ds_config key, e.g. strategy.config.zero_optimization
        config[key] = {**config[key], **value} if isinstance(config.get(key), dict) and isinstance(value, dict) \
            else value
    return config


def _owned_grad_fragment(p: nn.Parameter) -> torch.Tensor:
    """The fp32 gradient of the part of `p` this rank's ZeRO-1/2 optimizer partition owns (as
    deepspeed.utils.tensor_fragment.get_full_hp_grad reads it before its all_reduce)."""
    mapping = p._hp_mapping
    fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).to(torch.float32).flatten()
    if fragment.numel() == p.numel():  # bf16 keeps a full accumulation buffer: only the owned part counts
        fragment = fragment.narrow(0, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
    return fragment


class DeepSpeed(Strategy):
    def __init__(self, cfg, env, device, precision, dims, settings=StrategySettings()):
        super().__init__(cfg, env, device, precision, dims, settings)
        self.scaler = None  # DeepSpeed scales fp16 losses itself
        self.stage = cfg.stage
        self.engine = None
        self._batch: tuple[int, int] | None = None  # (micro-batch, accumulation steps) the engine is set to

    def describe(self) -> str:
        shards = {0: "nothing sharded (DDP-like)", 1: "optimizer state sharded", 2: "optimizer state and gradients "
                  "sharded", 3: "parameters, gradients and optimizer state sharded"}[self.stage]
        offload = ", optimizer offloaded to CPU" if self.cfg.offload_optimizer else ""
        return (f"DeepSpeed ZeRO-{self.stage} over {self.dp_size} data-parallel ranks: {shards}; "
                f"{self.precision}{offload}")

    def setup(self, model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> None:
        if self.device.type == "cpu":  # named, not guessed: DeepSpeed warns in every rank's log when it guesses
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # installed: the planner checked (gpt.parallel.traits)

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # ZeRO calls collectives torch has renamed; each call would print a FutureWarning.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        ensure_process_group(self.device)
        if self.device.type == "cpu":
            # On CPU, DeepSpeed's first init_distributed JIT-compiles a shared-memory all-reduce (about 80 CPU-s,
            # again for every install path) that only its inference kernels call, never ZeRO's training.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        model.to(self.device)
        optimizer = build_adamw(model, lr, weight_decay, betas, self.device)
        if self.cfg.offload_optimizer:
            # ZeRO-Offload steps on the CPU with DeepSpeed's vectorised Adam (JIT-built once, like the comm op),
            # over the same parameter groups and settings as our AdamW.
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(optimizer.param_groups, lr=lr, betas=betas, eps=optimizer.defaults["eps"],
                                         weight_decay=weight_decay, adamw_mode=True)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(self.cfg, self.precision, world_size=self.dp_size,
                                                reduce_dtype=self.reduce_dtype),
            dist_init_required=False)
        self.model = self.engine

    @property
    def unwrapped(self) -> nn.Module:
        return self.engine.module

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine casts the model itself

    def _configure(self, micro_batch: int, n_micro: int, grad_clip: float) -> None:
        if self._batch != (micro_batch, n_micro):
            self.engine.set_train_micro_batch_size(micro_batch)
            self.engine.set_train_batch_size(micro_batch * n_micro * self.dp_size)
            self._batch = micro_batch, n_micro
        # train.grad_clip reaches the strategy with each step; the engine and its ZeRO optimizer read it from
        # their config at init, so both copies are kept in step with it.
        self.engine._config.gradient_clipping = float(grad_clip)
        if hasattr(self.optimizer, "clip_grad"):
            self.optimizer.clip_grad = float(grad_clip)

    def train_step(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_micro: int,
                   lr: float, grad_clip: float, layer_norms: bool = False, loss_factor: float = 1.0) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        layers = ours = None
        clock = PhaseClock(self.device)
        for i, (x, y) in enumerate(micro_batches):
            if i == 0:
                self._configure(x.size(0), n_micro, grad_clip)
            loss = spread_nonfinite(self.engine(x, y)[1], loss_factor)  # the logits not held through backward
            self.engine.backward(loss)  # scaled by 1 / accumulation steps inside
            if i == n_micro - 1:
                clock.mark("fwd_bwd")  # the gradients are reduced; the engine's step below is the optimizer's
                if layer_norms:  # before the step, which frees the reduced gradients
                    layers = layer_grad_norms(self.local_gradients(), self.layer_keys, self.device)
                ours = self.leave_out_nonfinite()
                self.before_update()
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            total += loss.detach().float() / n_micro
        if ours is not None:
            del self.engine.optimizer.found_inf
        clock.mark("optimizer")
        # Left on the device: the reporter reads it to the host on log steps only.
        norm = self.engine.get_global_grad_norm() if ours is None else ours[1]
        norm = torch.as_tensor(norm if norm is not None else float("nan"), dtype=torch.float32)
        return StepResult(total, norm.detach(), layers, clock, self.skipped(ours))

    def leave_out_nonfinite(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where the engine's optimizer checks no overflow (ZeRO-0 outside fp16: our AdamW steps bare), the update is
        left out on the device, as other strategies leave it out (gpt.train.optim.step_unless): the reduced
        gradients' global norm, the same on every rank, is handed to the fused AdamW as found_inf. Returns
        (not finite, the norm), or None where the engine checks itself (ZeRO-1..3 on their norm, fp16's scaler)."""
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "overflow"):
            return None
        if not optimizer.defaults.get("fused"):
            raise TypeError(f"{type(optimizer).__name__} without fused=True cannot leave an update out on the device")
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.engine.module.parameters() if p.grad is not None])
        skipped = nonfinite(norm)
        optimizer.found_inf = skipped.to(torch.float32)
        return skipped, norm

    def skipped(self, ours: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        """Whether the update was left out: ours on the device, or the engine's verdict (it read its norm to the
        host, and skips a non-finite one); None under fp16, whose loss scaler skips steps of its own."""
        if self.precision == "fp16":
            return None
        if ours is not None:
            return ours[0]
        return torch.tensor(not self.engine.was_step_applied())

    @torch.no_grad()
    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, loss = self.engine(x, y, with_aux=False)
        return loss.detach().float()

    def local_gradients(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        """This rank's part of each gradient, in DeepSpeed's own order of lookup (deepspeed.utils.safe_get_full_grad
        without its per-parameter all_reduce): a plain gradient (ZeRO-0) is held by every rank; a ZeRO-3
        partition, or the fragment of a ZeRO-1/2 (or bf16) optimizer partition, by this rank alone."""
        from deepspeed.utils import safe_get_local_grad
        for name, p in self.engine.module.named_parameters():
            if getattr(p, "_hp_grad", None) is None and p.grad is not None:
                yield name, p.grad, self.dp_size
            elif hasattr(p, "ds_id"):
                yield name, safe_get_local_grad(p), 1
            elif getattr(p, "_hp_mapping", None) is not None:
                yield name, _owned_grad_fragment(p), 1

    def held_parameters(self) -> Iterator[torch.Tensor]:
        # ZeRO-3: the partition this rank holds (the parameter itself is empty outside a forward)
        return (getattr(p, "ds_tensor", p) for p in self.engine.module.parameters())

    def held_gradients(self) -> Iterator[torch.Tensor]:
        """ZeRO-1..3 reduce the gradients into this rank's partition, which the ZeRO optimizer keeps (its
        averaged_gradients: per parameter group, a flat buffer or per-parameter fragments), emptying .grad; a whole
        gradient still held (ZeRO-0's .grad, an fp32 accumulation buffer, grad_accum) counts too."""
        partitions = getattr(self.engine.optimizer, "averaged_gradients", {})
        own = (t for group in partitions.values() if group is not None
               for t in ([group] if isinstance(group, torch.Tensor) else group))
        whole = (g for p in self.engine.module.parameters() for g in (p.grad, getattr(p, "grad_accum", None))
                 if g is not None)
        return itertools.chain(own, whole)

    def held_optimizer_state(self) -> Iterator[torch.Tensor]:
        """AdamW's moments over this rank's partition, and the fp32 partition they update (the ZeRO optimizer's
        master weights: a copy, even when the model is fp32)."""
        optimizer = self.engine.optimizer
        masters = (getattr(optimizer, "single_partition_of_fp32_groups", None)
                   or getattr(optimizer, "fp32_partitioned_groups_flat", None) or [])
        return itertools.chain(super().held_optimizer_state(), masters)

    def parameter_bytes(self) -> int:
        total = 0
        for p in self.engine.module.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3: the partition this rank holds
            total += local.numel() * local.element_size()
        return total

    # --- checkpoints ----------------------------------------------------------------------------------
    def full_weights(self) -> dict[str, torch.Tensor]:
        """The model's fp32 weights by state-dict name on rank 0 ({} elsewhere), gathered from the ZeRO partitions
        one parameter at a time (each a collective): only rank 0 keeps a full copy in host memory."""
        from deepspeed.utils import safe_get_full_fp32_param
        module, keep = self.engine.module, self.env.rank == 0
        full: dict[int, torch.Tensor] = {}
        for p in module.parameters():  # each tensor once: gathering is a collective
            value = safe_get_full_fp32_param(p)
            if keep:
                full[id(p)] = (value if value is not None else p.detach()).float().cpu().clone()
        if not keep:
            return {}
        # Every name of a tied tensor, as in a plain module's state dict.
        weights = {name: full[id(p)] for name, p in module.named_parameters(remove_duplicate=False)}
        for prefix, sub in module.named_modules():
            for name, buffer in sub._buffers.items():
                if buffer is not None and name not in sub._non_persistent_buffers_set:
                    weights[f"{prefix}.{name}" if prefix else name] = buffer.detach().cpu().clone()
        return weights

    supports_async_save = False  # the engine writes its own checkpoint, synchronously
    syncs_own_files = False  # and its torch.save does not fsync: the commit syncs every file

    def save_state(self, folder: Path, async_group=None, last: bool = False) -> None:
        """The engine's checkpoint; the `last` save of a run adds the weights whole, as the DCP `model` entry that
        a reader without DeepSpeed reads. Any other's DCP part is empty: its `.metadata` marks the folder whole."""
        self.engine.save_checkpoint(str(folder / FOLDER), tag=TAG, save_latest=False)
        weights = self.full_weights() if last else {}  # a collective per parameter, on every rank
        if self.env.rank == 0:  # written by the rank that holds the weights
            dcp.save({"model": weights} if last else {}, checkpoint_id=folder, no_dist=True)

    def load_state(self, folder: Path) -> None:
        # DeepSpeed's own loader unpickles with weights_only=False (code); every file it reads goes through this
        self.engine.checkpoint_engine.load = load_deepspeed_file
        path, _ = self.engine.load_checkpoint(str(folder / FOLDER), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError("strategy", "deepspeed", f"a checkpoint written by strategy=deepspeed; {folder} has no "
                              "DeepSpeed engine state (resume it with the strategy that wrote it)")
