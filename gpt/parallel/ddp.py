"""DistributedDataParallel: a full replica on every rank, gradients all-reduced in buckets during backward."""
from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gpt.parallel.base import Strategy, on_meta
from gpt.parallel.mesh import ensure_process_group


def bucket_bytes(module: DistributedDataParallel) -> int:
    """Bytes of the reducer's gradient buckets, held from construction on beside every parameter's .grad: DDP copies
    each gradient into its bucket to all-reduce it, and back (without gradient_as_bucket_view, which makes each .grad a
    view into its bucket, the gradients are held twice)."""
    if module.gradient_as_bucket_view:
        return 0
    sizes = str(module._get_ddp_logging_data().get("bucket_sizes", ""))
    return sum(int(size) for size in sizes.split(",") if size)


class DDP(Strategy):
    def describe(self) -> str:
        return f"DDP, {self.dp_size} replicas"

    def wrap(self, model: nn.Module) -> nn.Module:
        ensure_process_group(self.device)
        device_ids = [self.device] if self.device.type == "cuda" else None
        # On the meta device (a dry run) DDP's start-up check that every rank's shapes match, and its broadcast of
        # rank 0's weights, are left out: both read values, which a meta tensor has not.
        return DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=self.cfg.bucket_cap_mb,
                                       init_sync=not on_meta(model))

    def sync_gradients(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_micro_step else self.model.no_sync()

    def gradient_buffer_bytes(self) -> int:
        return bucket_bytes(self.model)
