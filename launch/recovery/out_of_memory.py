"""A rank that ran out of device memory in a training step (gpt.train.out_of_memory): the smaller micro-batch the run
goes on with, the global batch kept exactly (the accumulation grows by as much; Composer's automatic micro-batching
halves it so too), written into the run's config.yaml, which the next round's ranks, a requeue and a chained job
read; and what a later `python -m launch` of the same command keeps of it (keep_smaller_micro_batch, which planning
calls). Torch-free.

    attempts.jsonl   the attempt's line: "out_of_memory": {rank, host, step, micro_batch, accumulation, global_batch,
                     activation_checkpointing, error, snapshot?, next_micro_batch, next_accumulation}
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.config import schema
from gpt.config.train import TrainConfig
from gpt.run_folder import AttemptLine, RunFolder
from launch import launch_config

HINT = "train.activation_checkpointing=full or strategy=fsdp needs less"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RanOut:
    """One rank's out-of-memory, from its record (RanOutOfMemory.record, or an attempt's line)."""

    rank: int
    step: int
    micro_batch: int
    accumulation: int
    global_batch: int
    host: str = ""
    activation_checkpointing: str = "none"
    error: str = ""
    snapshot: str | None = None

    @classmethod
    def of(cls, record: dict[str, Any]) -> RanOut:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

    @property
    def next_micro_batch(self) -> int | None:
        """The largest micro-batch below this one that divides it (half of an even one), so that the accumulation
        grows by a whole factor and the global batch stays exactly as it was; None at 1."""
        return next((d for d in range(self.micro_batch // 2, 0, -1) if self.micro_batch % d == 0), None)

    @property
    def next_accumulation(self) -> int:
        return self.accumulation * self.micro_batch // (self.next_micro_batch or self.micro_batch)

    def record(self) -> dict[str, Any]:
        """What the attempt's line says of it."""
        said = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return {**said, **({"next_micro_batch": self.next_micro_batch, "next_accumulation": self.next_accumulation}
                           if self.next_micro_batch else {})}

    @property
    def said(self) -> str:
        return f"rank {self.rank} ran out of device memory at step {self.step} with micro-batch {self.micro_batch}"

    def going_on(self, who: str) -> str:
        """The one line: `who` ("the next round") trains with the smaller micro-batch."""
        return (f"{self.said}: {who} trains with micro-batch {self.next_micro_batch} and accumulation "
                f"{self.next_accumulation}, the same global batch {self.global_batch}")

    def stop(self) -> str:
        """At micro-batch 1 nothing smaller is left: what needs less memory, and what held it."""
        if self.snapshot:
            return (f"{self.said} ({self.error}); its memory snapshot is {self.snapshot} (drag it into "
                    f"https://pytorch.org/memory_viz); {HINT}")
        return (f"{self.said} ({self.error}); run again with profile.memory_snapshot=true to see what held it; "
                f"{HINT}")


def write_micro_batch(run_dir: Path, micro_batch: int) -> None:
    """The run's record of its micro-batch: every later rank of the run reads config.yaml."""
    path = RunFolder(run_dir).config
    run = launch_config.load(path)
    schema.save(dataclasses.replace(run, train=dataclasses.replace(run.train, micro_batch_size=micro_batch)), path)


def keep_smaller_micro_batch(run_dir: Path, train: TrainConfig, dp: int) -> TrainConfig:
    """`train` with the micro-batch the run went on with after a rank ran out of memory, where this command asks
    again for one it ran out with (kept_micro_batch): said in one line."""
    if train.micro_batch_size == "auto":  # not chosen here (the data is prepared in a job): nothing was recorded
        return train
    attempts = RunFolder(run_dir).attempts.read()
    micro, why = kept_micro_batch(attempts, train.micro_batches(dp)[0], train.activation_checkpointing)
    if not why:
        return train
    log.info("%s", why)
    return dataclasses.replace(train, micro_batch_size=micro)


def kept_micro_batch(attempts: list[AttemptLine], asked: int, checkpointing: str) -> tuple[int, str]:
    """The micro-batch a launch that asks for `asked` trains with, and the line that says why when it is not that:
    the run's newest smaller one, where `asked` is a micro-batch it ran out of memory with under the same
    activation checkpointing (the same command again, or `auto` choosing it again); any other value is the user's
    explicit ask, taken as it is."""
    ran_out = [RanOut.of(dict(a.out_of_memory)) for a in attempts if a.out_of_memory]
    same = [r for r in ran_out if r.activation_checkpointing == checkpointing]
    halved = [r for r in same if r.next_micro_batch]
    if not halved or asked not in {r.micro_batch for r in same} or halved[-1].next_micro_batch >= asked:
        return asked, ""
    newest = halved[-1]
    return newest.next_micro_batch, (
        f"train.micro_batch_size={newest.next_micro_batch} kept, the same global batch: this run ran out of device "
        f"memory with micro-batch {asked} (rank {newest.rank}, step {newest.step}); another train.micro_batch_size "
        "on the command is taken as asked")
