"""AdamW and the learning-rate schedule (linear warm-up, then cosine decay to min_lr)."""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                device: torch.device) -> torch.optim.AdamW:
    """Decay matrices (weights, embeddings) but not vectors (biases, norm gains), as GPT-2 and LLaMA do."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    # foreach stays off on CPU: a mix of Tensor and DTensor parameters (tensor/pipeline splits) breaks it.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None,
                             foreach=None if fused else False)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based). A pure function of the step, so a resumed run
    follows the same schedule without storing scheduler state."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
