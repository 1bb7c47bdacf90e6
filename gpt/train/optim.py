"""AdamW: its parameter groups, the fused build, and a step left out on the device (the learning-rate schedule
is gpt.train.schedule)."""
from __future__ import annotations

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


def step_unless(optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor,
                kernel_owner: torch.optim.Optimizer | None = None) -> None:
    """optimizer.step(), left out on the device where `nonfinite` (a 0-dim bool there) is true, with no host read:
    fused AdamW takes it as `found_inf`, the tensor GradScaler hands it, and then changes no weight, moment or step
    count. `kernel_owner`: the optimizer whose step runs the kernel, when `optimizer` delegates to it (ZeRO-1)."""
    owner = kernel_owner or optimizer
    if not owner.defaults.get("fused"):
        raise TypeError(f"{type(owner).__name__} without fused=True cannot leave an update out on the device")
    owner.found_inf = nonfinite.to(torch.float32)
    try:
        optimizer.step()
    finally:
        del owner.found_inf

