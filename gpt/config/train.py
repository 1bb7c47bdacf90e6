"""The train section (configs/train/): the training loop's settings and their validation."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from gpt.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
# fp8: torchao's float8 training (gpt.model.float8): its scaling recipes; every layer it does not convert runs bf16
FP8_RECIPES = ("tensorwise", "rowwise")
# The dtype gradients are reduced in across data-parallel ranks (train.reduce_dtype)
REDUCE_DTYPES = ("fp32", "bf16")
# The dtype of the residual stream between blocks (train.residual_dtype)
RESIDUAL_DTYPES = ("fp32", "bf16")
# SDPA's kernels (gpt.model.attention); `auto` lets SDPA choose, a named one is the only one allowed (strict).
ATTENTION = ("auto", "flash", "cudnn", "efficient", "math")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# The modes whose compiled graphs run as CUDA graphs on a GPU (torch._inductor.list_mode_options: triton.cudagraphs).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# What torch.compile covers: each block, the whole model with its loss, or the whole model where the strategy
# allows (single, ddp, zero1 without tensor parallelism) and each block elsewhere.
COMPILE_SCOPES = ("blocks", "model", "auto")
# The learning-rate schedules (gpt.train.schedule) and the shapes of a wsd decay, as TorchTitan's decay_type.
SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "sqrt", "cosine")


@dataclass
class TrainConfig:
    max_steps: int = 2000
    global_batch_size: int = 12
    # null: the per-rank batch; auto: the largest that fits the device's memory, chosen at planning
    # (launch.planning.memory_fit)
    micro_batch_size: int | str | None = None
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int | None = None
    schedule: str = "cosine"  # cosine | wsd (warm-up, stable, then decay over the last decay_fraction)
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    precision: str = "fp32"
    fp8_recipe: str = "tensorwise"  # with precision=fp8: tensorwise or rowwise scaling (torchao's recipes)
    # with precision=fp8 under FSDP: the converted layers' weights all-gathered in float8, not bf16 (half the bytes),
    # their scales precomputed after each update in one all-reduce (torchao's, as TorchTitan's option)
    fp8_all_gather: bool = False
    # fp32: gradients reduced across data-parallel ranks in fp32; bf16: half the bytes, rounded (docs/strategies.md)
    reduce_dtype: str = "fp32"
    compile: bool = False
    compile_mode: str = "default"
    compile_scope: str = "blocks"
    # Inductor's caches (FX graphs, AOTAutograd, Triton kernels): null keeps them in the run folder (compile_cache/),
    # so a requeued attempt loads its compiled graphs; a site may name a faster shared folder (gpt.train.compile_cache)
    compile_cache_dir: str | None = None
    attention: str = "auto"
    # q, k and v as one matmul (nanoGPT's c_attn), their weights still three parameters: checkpoints and exports as
    # without it (gpt.model.transformer.CausalSelfAttention)
    fused_qkv: bool = False
    # fp32: under autocast the residual stream between blocks stays fp32 (fp32 embeddings, bf16 outputs added to
    # it); bf16: held in bf16 from the embeddings on, as FSDP's mixed precision holds it and llm.c trains
    residual_dtype: str = "fp32"
    device: str = "auto"
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    layer_grad_norms: bool = True
    progress: bool = True
    activation_checkpointing: str = "none"  # none | full | every_K (every K-th layer, from the first)

    def validate(self) -> None:
        for key in ("max_steps", "global_batch_size", "log_interval", "eval_batches"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}", getattr(self, key), "a positive integer")
        micro = self.micro_batch_size
        if micro not in (None, "auto") and (not isinstance(micro, int) or isinstance(micro, bool) or micro <= 0):
            raise ConfigError("train.micro_batch_size", micro, "a positive integer, null (the per-rank batch) or auto "
                              "(the largest that fits the device's memory)")
        if self.precision not in PRECISIONS:
            raise ConfigError("train.precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        for key, valid in (("compile_mode", COMPILE_MODES), ("compile_scope", COMPILE_SCOPES),
                           ("attention", ATTENTION), ("fp8_recipe", FP8_RECIPES), ("reduce_dtype", REDUCE_DTYPES),
                           ("residual_dtype", RESIDUAL_DTYPES)):
            if getattr(self, key) not in valid:
                raise ConfigError(f"train.{key}", getattr(self, key), f"one of {', '.join(valid)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("train.device", self.device, "auto, cpu or cuda")
        if self.lr <= 0:
            raise ConfigError("train.lr", self.lr, "a positive learning rate")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("train.min_lr", self.min_lr, f"between 0 and train.lr={self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("train.betas", list(self.betas), "two numbers in [0, 1), e.g. [0.9, 0.95]")
        if self.warmup_steps < 0 or self.eval_interval < 0:
            raise ConfigError("train.warmup_steps", self.warmup_steps, "0 or more (eval_interval too)")
        self.recompute_every()
        self.check_schedule()
        if self.fp8_all_gather and (self.precision != "fp8" or self.fp8_recipe != "tensorwise"):
            raise ConfigError("train.fp8_all_gather", True, "false, or true with train.precision=fp8 and "
                              "train.fp8_recipe=tensorwise (torchao gathers float8 weights with one scale each)")
        if self.residual_dtype == "bf16" and self.precision not in ("bf16", "fp8"):
            raise ConfigError("train.residual_dtype", "bf16", f"fp32 with train.precision={self.precision} (a bf16 "
                              "residual stream is for bf16 compute: train.precision=bf16 or fp8)")
        if self.fused_qkv and self.precision == "fp8":
            raise ConfigError("train.fused_qkv", True, "false with train.precision=fp8 (float8 converts q's layer and "
                              "not k's and v's: one matmul of the three would bypass it)")
        if self.precision == "fp8" and not self.compile:
            raise ConfigError("train.precision", "fp8", "bf16, or fp8 with train.compile=true (uncompiled, torchao's "
                              "float8 casts and scales run as kernels of their own: slower than bf16)")

    def numerics(self) -> dict[str, Any]:
        """The precision, and fp8's scaling recipe: a run continues only with the same (launch.run.identity; its
        checkpoints' fingerprint, gpt.train.state). train.reduce_dtype, train.residual_dtype and train.fused_qkv may
        change, as the node count may: they round the gradients' sums or the activations, and hold no state
        (docs/strategies.md, docs/configuration.md)."""
        keys = {"train.precision": self.precision}
        return {**keys, "train.fp8_recipe": self.fp8_recipe} if self.precision == "fp8" else keys

    @property
    def compute_precision(self) -> str:
        """The precision of autocast, mixed precision and the activations: fp8's layers not converted run bf16."""
        return "bf16" if self.precision == "fp8" else self.precision

    def check_fp8(self, device: str) -> None:
        """Refuse, at planning, float8 where it cannot run: on a CPU (no float8 matmuls), or without torchao. A GPU
        older than compute capability 8.9 is refused by its ranks, which see it (gpt.model.float8.check_device)."""
        if self.precision != "fp8":
            return
        if device == "cpu":
            raise ConfigError("train.precision", "fp8", "bf16 or fp32 on a CPU run (float8 matmuls need an NVIDIA GPU "
                              "of compute capability 8.9 or more: L4, L40, H100, H200, B200)")
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError("train.precision", "fp8", "bf16, or install torchao for fp8: pip install -e '.[fp8]'")

    def check_schedule(self) -> None:
        for key, valid in (("schedule", SCHEDULES), ("decay_shape", DECAY_SHAPES)):
            if getattr(self, key) not in valid:
                raise ConfigError(f"train.{key}", getattr(self, key), f"one of {', '.join(valid)}")
        if self.schedule != "wsd":
            return
        if self.decay_steps is not None:
            raise ConfigError("train.decay_steps", self.decay_steps, "null with train.schedule=wsd (it decays over "
                              "the last train.decay_fraction of max_steps; that fraction sets the decay's length)")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError("train.decay_fraction", self.decay_fraction, "a fraction of max_steps in [0, 1]")
        if self.decay_start < self.warmup_steps:
            raise ConfigError("train.decay_fraction", self.decay_fraction, f"a smaller fraction: with max_steps="
                              f"{self.max_steps} the decay would start at step {self.decay_start}, inside the "
                              f"{self.warmup_steps} warm-up steps")

    def check_attention(self, device: str) -> None:
        """Refuse, at planning, a kernel the planned device cannot run: SDPA has no cuDNN or memory-efficient
        kernel on a CPU, and on a GPU its Flash and cuDNN kernels take bf16 or fp16 only."""
        kernel = self.attention
        if device == "cpu" and kernel in ("cudnn", "efficient"):
            raise ConfigError("train.attention", kernel, "auto, flash or math on a CPU run (SDPA has no "
                              f"{kernel} kernel on a CPU)")
        if device == "cuda" and kernel in ("flash", "cudnn") and self.precision == "fp32":
            raise ConfigError("train.attention", kernel, f"auto, efficient or math with train.precision=fp32 (the "
                              f"{kernel} kernel takes bf16 or fp16 on a GPU); or set train.precision=bf16")

    def check_cuda_graphs(self, dp_size: int) -> None:
        """Refuse, at planning, CUDA graphs with gradient accumulation: a graph's replay writes its outputs into the
        buffers of the replay before, so the gradients one micro-step leaves are overwritten by the next (torch
        refuses it at run time). Needs train.device resolved and the micro-batch chosen (not auto)."""
        graphs = self.compile and self.device == "cuda" and self.compile_mode in CUDA_GRAPH_MODES
        if not graphs or self.micro_batch_size == "auto":
            return
        micro, steps = self.micro_batches(dp_size)
        if steps > 1:
            raise ConfigError("train.compile_mode", self.compile_mode, f"default with {steps} micro-steps per "
                              f"optimizer step (train.micro_batch_size={micro} of a per-rank batch of {micro * steps}: "
                              "CUDA graphs replay into the same buffers, so a micro-step would overwrite the gradients "
                              f"of the one before); or train.micro_batch_size={micro * steps}, one micro-step")

    def recompute_every(self) -> int:
        """Every how many layers activation checkpointing recomputes one (0: none, 1: every layer)."""
        policy = str(self.activation_checkpointing)
        k = policy.removeprefix("every_")
        if policy in ("none", "full"):
            return 0 if policy == "none" else 1
        if policy.startswith("every_") and k.isdigit() and int(k) > 0:
            return int(k)
        raise ConfigError("train.activation_checkpointing", policy, "none, full, or every_K for every K-th layer "
                          "(e.g. every_2)")

    @property
    def decay_end(self) -> int:
        """The step the decay reaches min_lr: cosine's decay_steps, else max_steps."""
        return (self.decay_steps or self.max_steps) if self.schedule == "cosine" else self.max_steps

    @property
    def decay_start(self) -> int:
        """wsd: the first step of the decay (the last round(decay_fraction * max_steps) steps decay, as TorchTitan's
        decay_ratio); before it the learning rate does not depend on max_steps."""
        return self.max_steps - round(self.decay_fraction * self.max_steps)

    def per_rank_batch(self, dp_size: int) -> int:
        """Sequences per rank per optimizer step for this data-parallel size."""
        if self.global_batch_size % dp_size:
            raise ConfigError("train.global_batch_size", self.global_batch_size,
                              f"a multiple of the data-parallel size {dp_size}")
        return self.global_batch_size // dp_size

    def micro_batches(self, dp_size: int) -> tuple[int, int]:
        """(sequences per rank per forward, micro-steps per optimizer step) for this data-parallel size."""
        per_rank = self.per_rank_batch(dp_size)
        if self.micro_batch_size == "auto":  # the plan writes the chosen one to config.yaml, which every rank reads
            raise ConfigError("train.micro_batch_size", "auto", "a positive integer or null here: auto is chosen when "
                              "python -m launch plans the run")
        micro = self.micro_batch_size or per_rank
        if micro <= 0 or per_rank % micro:
            raise ConfigError("train.micro_batch_size", self.micro_batch_size,
                              f"a divisor of the per-rank batch {per_rank} (= global {self.global_batch_size} / "
                              f"data-parallel size {dp_size})")
        return micro, per_rank // micro
