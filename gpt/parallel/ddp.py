"""DistributedDataParallel: a full replica on every rank, gradients all-reduced in buckets during backward."""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from gpt.parallel.base import Strategy, on_meta
from gpt.parallel.mesh import ensure_process_group


# torch 2.13 renamed broadcast_buffers (now deprecated) to forward_sync_buffers; earlier releases know only the first
_NO_FORWARD_SYNC = ({"forward_sync_buffers": False}
                    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else {"broadcast_buffers": False})


def replicate(module: nn.Module, device: torch.device, bucket_cap_mb: float,
              group: dist.ProcessGroup | None = None, reduce_dtype: str = "fp32") -> DistributedDataParallel:
    """`module` as DDP builds a replica here (the whole model, or a pipeline stage over its replicas).

    gradient_as_bucket_view: every .grad is a view into the reducer's bucket, so the gradients are held once (the
    buckets), not twice (.grad beside the buckets DDP copies them into: 3.87 GiB more for llama_1b), and need no
    copy either way. They stay views only while zeroed in place (Strategy.zero_grads_in_place): set to None, the
    next backward allocates new ones beside the buckets, and under gradient accumulation holds both.
    forward_sync_buffers=False: no broadcast of rank 0's buffers before every forward. The model's only buffers
    are the RoPE tables (gpt.model.transformer.RotaryEmbedding), computed from the config and never written after;
    DDP's start-up sync still copies rank 0's to every rank. On the meta device (a dry run) that sync and the
    check that every rank's shapes match are left out: both read values, which a meta tensor has not."""
    device_ids = [device] if device.type == "cuda" else None
    ddp = DistributedDataParallel(module, device_ids=device_ids, process_group=group, bucket_cap_mb=bucket_cap_mb,
                                  gradient_as_bucket_view=True, init_sync=not on_meta(module), **_NO_FORWARD_SYNC)
    if reduce_dtype == "bf16":  # each bucket cast to bf16, all-reduced, and written back (train.reduce_dtype)
        ddp.register_comm_hook(group, default_hooks.bf16_compress_hook)
    return ddp


def bucket_bytes(module: DistributedDataParallel) -> int:
    """Bytes of the reducer's gradient buckets held beside the parameters' .grad: none where every .grad is a view
    into its bucket (replicate); without gradient_as_bucket_view DDP copies each gradient into its bucket to
    all-reduce it, and back, and the gradients are held twice."""
    if module.gradient_as_bucket_view:
        return 0
    sizes = str(module._get_ddp_logging_data().get("bucket_sizes", ""))
    return sum(int(size) for size in sizes.split(",") if size)


class DDP(Strategy):
    zero_grads_in_place = True  # each .grad is a view into DDP's buckets (replicate)

    def describe(self) -> str:
        reduced = f", gradients reduced in {self.reduce_dtype}" if self.reduce_dtype != "fp32" else ""
        return f"DDP, {self.dp_size} replicas{reduced}"

    def wrap(self, model: nn.Module) -> nn.Module:
        ensure_process_group(self.device)
        return replicate(model, self.device, self.cfg.bucket_cap_mb, reduce_dtype=self.reduce_dtype)

    def sync_gradients(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_micro_step else self.model.no_sync()

    def gradient_buffer_bytes(self) -> int:
        return bucket_bytes(self.model)
