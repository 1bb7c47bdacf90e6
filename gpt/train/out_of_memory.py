"""A rank that ran out of device memory in a training step (its forward, backward or optimizer update): the error the
trainer raises in place of torch's, with what the one decision (launch.recovery.decision) needs to go on with a
smaller micro-batch and the same global batch: the rank, the step, the micro-batch and accumulation, the global batch.
Torch-free at import (the launcher's side reads RanOutOfMemory); the trainer's hook catches torch's error."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from gpt.errors import error_line
from gpt.train.hooks import LoopHook


class RanOutOfMemory(Exception):
    """`record` goes into the attempt's line (`out_of_memory`); the profiler adds its memory snapshot's path."""

    def __init__(self, rank: int, host: str, step: int, micro_batch: int, accumulation: int, global_batch: int,
                 checkpointing: str, error: str):
        self.record: dict[str, Any] = {
            "rank": rank, "host": host, "step": step, "micro_batch": micro_batch, "accumulation": accumulation,
            "global_batch": global_batch, "activation_checkpointing": checkpointing, "error": error}
        super().__init__(f"rank {rank} ran out of device memory at step {step} with micro-batch {micro_batch} "
                         f"({error})")


class OutOfMemoryHook(LoopHook):
    """The innermost hook around the strategy's step: torch's out-of-memory error there becomes RanOutOfMemory, with
    the rank's batch shape (`shape`: micro-batch, accumulation, global batch, activation checkpointing)."""

    def __init__(self, rank: int, host: str, shape: tuple[int, int, int, str]):
        self.rank, self.host, self.shape = rank, host, shape

    @contextlib.contextmanager
    def around_step(self, step: int) -> Iterator[None]:
        import torch

        try:
            yield
        except torch.OutOfMemoryError as e:
            raise RanOutOfMemory(self.rank, self.host, step, *self.shape, error_line(e, limit=300)) from None
