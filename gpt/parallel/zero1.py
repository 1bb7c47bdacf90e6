"""ZeRO stage 1 in plain PyTorch: DDP for the gradients, ZeroRedundancyOptimizer for the optimizer state.

Each rank keeps AdamW state (two fp32 moments) only for its partition of the parameters, steps only those, and
hands them to the others in one all-gather: every rank's bucket is a slice of one flat buffer (the parameters are
views into it), not one broadcast per rank or per parameter. Checkpoints hold each rank's moments under the
parameters' names, so they load into any strategy."""
from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from gpt.train.optim import build_adamw, step_unless
from gpt.parallel.base import on_device
from gpt.parallel.ddp import DDP


class GatheringZero(ZeroRedundancyOptimizer):
    """torch's ZeroRedundancyOptimizer with every rank's bucket a slice of one flat buffer per device, each slice as
    long as the longest bucket: after the local step one all-gather (all_gather_single) fills every slice, where torch
    broadcasts one bucket per rank (W collectives every step on every rank, each paying its latency). Both only
    copy the stepped values: the parameters come out bitwise the same."""

    def _build_param_buckets(self) -> None:
        """torch's buckets (it calls this at construction and when trainability changes), laid out in `_flats`."""
        self._buckets = []
        self._flats: list[tuple[torch.Tensor, int]] = []  # (flat buffer, slice length) per device
        for device, params_per_rank in self._device_to_params_per_rank.items():
            trainable = [[p for p in params if p.requires_grad] for params in params_per_rank]
            for params in params_per_rank:  # torch's rule: a frozen parameter keeps storage of its own
                for p in params:
                    if not p.requires_grad:
                        p.data = p.data.detach().clone()
            dtype = next((p.dtype for ps in trainable for p in ps), torch.float32)  # torch's: one dtype per device
            width = max(1, *(sum(p.numel() for p in ps) for ps in trainable))
            flat = torch.zeros(width * len(trainable), dtype=dtype, device=device)
            self._buckets.append([_fill(flat[r * width:(r + 1) * width], ps) for r, ps in enumerate(trainable)])
            self._flats.append((flat, width))

    def _sync_params(self) -> None:
        for flat, width in self._flats:
            # a copy: gloo does not promise an all-gather whose input aliases its output (NCCL does)
            mine = flat[self.rank * width:(self.rank + 1) * width].clone()
            # torch 2.13 deprecates all_gather_into_tensor for all_gather_single, which earlier releases lack
            gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
            gather(flat, mine, group=self.process_group)


def _fill(bucket: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """Copy `params` into the front of `bucket` and make each a view into it."""
    offset = 0
    for p in params:
        view = bucket[offset:offset + p.numel()]
        view.copy_(p.data.flatten())
        p.data = view.view_as(p.data)
        offset += p.numel()
    return bucket


class Zero1(DDP):
    def describe(self) -> str:
        return f"ZeRO-1 (ZeroRedundancyOptimizer over DDP), optimizer state split over {self.dp_size} ranks"

    def setup(self, model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> None:
        on_device(model, self.device)
        if self.compile:
            self.compile.apply(model)
        self.model = self.wrap(model)
        # The same parameter groups and settings as every other strategy's AdamW, partitioned over the ranks.
        reference = build_adamw(self.model, lr, weight_decay, betas, self.device)
        groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in reference.param_groups]
        accepted = inspect.signature(type(reference)).parameters
        defaults = {k: v for k, v in reference.defaults.items()
                    if k in accepted and k not in ("params", "weight_decay")}
        self.optimizer = GatheringZero(groups, optimizer_class=type(reference),
                                                 parameters_as_bucket_view=True, **defaults)

    def optimizer_step(self, skipped: torch.Tensor) -> None:
        # the local AdamW runs the kernel; ZeRO's step then all-gathers the partitions (unchanged where left out)
        step_unless(self.optimizer, skipped, kernel_owner=self.optimizer.optim)

    def state_parts(self):
        # The local optimizer steps this rank's partition: its state is what this rank saves and restores.
        return [(self.model, self.optimizer.optim)]
