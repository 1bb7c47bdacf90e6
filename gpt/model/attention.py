"""The attention kernel (train.attention): which of SDPA's kernels a run may use, and the one it does use.

`auto` leaves the choice to SDPA. A named kernel is the only one allowed (torch.nn.attention.sdpa_kernel around the
model's scaled_dot_product_attention), so SDPA raises rather than fall back when that kernel cannot run the device,
dtype or shape: `check` tries it once at start-up, on the model's shape, and turns that into one line.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode

from gpt.config.model import ModelConfig
from gpt.errors import UserError

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
# The aten operator each fused kernel dispatches to; SDPA's math kernel is a decomposition with none of these.
OPERATORS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_flash_attention_for_cpu": "flash",
             "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_efficient_attention": "efficient",
             "_scaled_dot_product_fused_attention_overrideable": "overrideable"}


def backends(setting: str) -> list[SDPBackend] | None:
    """The kernels SDPA may use under train.attention=`setting`; None: any (SDPA chooses)."""
    return None if setting == "auto" else [KERNELS[setting]]


def allowed(kernels: list[SDPBackend] | None) -> contextlib.AbstractContextManager:
    """Around a scaled_dot_product_attention call: only `kernels`, or SDPA's own choice when None."""
    return contextlib.nullcontext() if kernels is None else torch.nn.attention.sdpa_kernel(kernels)


class KernelSeen(TorchDispatchMode):
    """Records which SDPA kernel ran, from the aten operators dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = "math"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.kernel = OPERATORS.get(name, self.kernel)
        return func(*args, **(kwargs or {}))


def check(cfg: ModelConfig, setting: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel SDPA runs for this model's attention under `setting`, on `device` in `dtype`: one forward and
    backward of one query group (the model's ratio of query to key/value heads) at full length, with the model's
    dropout. Raises UserError when a named kernel cannot run it."""
    group = cfg.n_head // cfg.n_kv_head
    q = torch.randn(1, group, cfg.block_size, cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
    kv = torch.randn(1, 1, cfg.block_size, cfg.head_dim, device=device, dtype=dtype)
    kernels = backends(setting)
    seen = KernelSeen()
    try:
        with allowed(kernels), seen, warnings.catch_warnings(record=True) as why:  # a GPU warns why it refused
            warnings.simplefilter("always")
            y = F.scaled_dot_product_attention(q, kv, kv, is_causal=True, dropout_p=cfg.dropout, enable_gqa=group > 1)
            y.sum().backward()
    except RuntimeError as e:
        if kernels is None:
            raise
        reasons = [line.strip() for w in why for line in str(w.message).splitlines()
                   if line.strip() and not line.rstrip().endswith(":")] or [str(e).split(". ")[0]]
        raise UserError(f"train.attention={setting} is not valid: SDPA's {setting} kernel cannot run this model's "
                        f"attention on {device.type} in {str(dtype).removeprefix('torch.')} (head_dim={cfg.head_dim}, "
                        f"{group} query head(s) per key/value head, dropout {cfg.dropout}): {'; '.join(reasons)}. "
                        "Use train.attention=auto to let SDPA choose") from None
    return seen.kernel
