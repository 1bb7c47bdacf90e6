"""A rank that ran out of device memory in a training step (its forward, backward or optimizer update): the error the
trainer raises in place of torch's, with what the one decision (launch.recovery.decision) needs to go on with a
smaller micro-batch and the same global batch: the rank, the step, the micro-batch and accumulation, the global batch.
Torch-free."""
from __future__ import annotations

from typing import Any


class RanOutOfMemory(Exception):
    """`record` goes into the attempt's line (`out_of_memory`); the profiler adds its memory snapshot's path."""

    def __init__(self, rank: int, host: str, step: int, micro_batch: int, accumulation: int, global_batch: int,
                 checkpointing: str, error: str):
        self.record: dict[str, Any] = {
            "rank": rank, "host": host, "step": step, "micro_batch": micro_batch, "accumulation": accumulation,
            "global_batch": global_batch, "activation_checkpointing": checkpointing, "error": error}
        super().__init__(f"rank {rank} ran out of device memory at step {step} with micro-batch {micro_batch} "
                         f"({error})")
