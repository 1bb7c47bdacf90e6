"""AdamW and the learning-rate schedule (linear warm-up, then cosine decay to min_lr)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (weights, embeddings) but not vectors (biases, norm gains), as GPT-2 and LLaMA do.

    Plain tensors and DTensors go to separate groups: fused and foreach kernels take one group per call and
    refuse a list that mixes them ("got mixed torch.Tensor and DTensor"), which tensor parallelism without a
    sharding wrapper leaves (a pipeline stage's norms stay plain). Empty groups are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for decay, wd in ((True, weight_decay), (False, 0.0)):
        for distributed in (False, True):
            chosen = [p for p in params if (p.dim() >= 2) == decay and isinstance(p, DTensor) == distributed]
            if chosen:
                groups.append({"params": chosen, "weight_decay": wd})
    return groups


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                device: torch.device) -> torch.optim.AdamW:
    """Fused AdamW on every device torch has the kernel for (CUDA and the CPU alike, so CPU runs take the path
    GPU runs take); else torch's default."""
    fused = device.type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), fused=fused or None)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based). A pure function of the step, so a resumed run
    follows the same schedule without storing scheduler state."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
