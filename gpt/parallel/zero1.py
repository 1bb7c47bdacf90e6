"""ZeRO stage 1 in plain PyTorch: DDP for the gradients, ZeroRedundancyOptimizer for the optimizer state.

Each rank keeps AdamW state (two fp32 moments) only for its partition of the parameters, steps only those, and
broadcasts them to the others: one bucket per rank (the parameters are views into it), not one call per parameter.
Checkpoints hold each rank's moments under the parameters' names, so they load into any strategy."""
from __future__ import annotations

import inspect

import torch

from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from gpt.train.optim import build_adamw, step_unless
from gpt.parallel.base import on_device
from gpt.parallel.ddp import DDP


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
        self.optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=type(reference),
                                                 parameters_as_bucket_view=True, **defaults)

    def optimizer_step(self, skipped: torch.Tensor) -> None:
        # the local AdamW runs the kernel; ZeRO's step then broadcasts the partitions (unchanged where left out)
        step_unless(self.optimizer, skipped, kernel_owner=self.optimizer.optim)

    def state_parts(self):
        # The local optimizer steps this rank's partition: its state is what this rank saves and restores.
        return [(self.model, self.optimizer.optim)]
