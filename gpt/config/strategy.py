"""The strategy and parallel sections: which parallel strategy (strategy=NAME, one of those registered in
gpt.parallel.traits) with its options, and the layout's sizes (gpt.parallel.layout). The strategies' keys are one
dataclass, their union: each strategy reads its own and leaves the others at their defaults (its traits say which,
and refuse a non-default value of a key only others read)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from gpt.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved")
DATA_PARALLEL = ("ddp", "fsdp")  # strategy=pipeline: data parallelism inside its stages
AXES = ("pp", "dp_replicate", "dp_shard", "tp")  # the layout's sizes, outermost first


@dataclass(frozen=True)
class StrategyConfig:
    name: str
    bucket_cap_mb: float = 25.0  # ddp, zero1, pipeline (dp=ddp): gradient all-reduce bucket size
    reshard_after_forward: bool = True  # fsdp, pipeline (dp=fsdp): free each layer's gathered parameters (ZeRO-3)
    cpu_offload: bool = False  # fsdp, pipeline (dp=fsdp): parameters and optimizer state in CPU memory (GPU runs)
    stage: int = 2  # deepspeed: ZeRO stage; 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters
    offload_optimizer: bool = False  # deepspeed: ZeRO-Offload, optimizer state and step on the CPU
    overlap_comm: bool = False  # deepspeed: overlap gradient reduction with backward (stage >= 2)
    reduce_bucket_size: int = 50_000_000  # deepspeed: elements per gradient reduction bucket
    config: dict[str, Any] = field(default_factory=dict)  # deepspeed: merged into the generated ds_config last
    schedule: str = "1f1b"  # pipeline: gpipe | 1f1b | interleaved (stages_per_rank stages on each rank)
    microbatches: int | None = None  # pipeline: micro-batches per step and replica, >= parallel.pp; null: pp
    stages_per_rank: int = 2  # pipeline, interleaved only: virtual stages per rank (pp x this <= model.n_layer)
    dp: str = "ddp"  # pipeline: data parallel inside stages, ddp (schedule=1f1b only) | fsdp (any schedule)
    # one key per knob: keys this section no longer has, refused with the key to use
    MOVED: ClassVar[dict[str, str]] = {"pp": "parallel.pp (the layout's pipeline stages)",
                                       "activation_checkpointing": "train.activation_checkpointing=full (any strategy)"}

    def pipeline_microbatches(self, pp: int) -> int:
        return self.microbatches or pp

    def check_values(self) -> None:
        """The values of the keys, once the strategy's traits (gpt.parallel.traits: the registry knows which
        strategy reads which key) have refused another strategy's key: a key the strategy does not read is named
        as such, not judged by its value."""
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError("strategy.stage", self.stage, "0, 1, 2 or 3 (ZeRO stage)")
        self.validate_pipeline()

    def validate_pipeline(self) -> None:
        """strategy=pipeline's own keys; what they need of the stages, the world size and the model is checked with
        the layout (gpt.parallel.traits)."""
        if self.schedule not in SCHEDULES:
            raise ConfigError("strategy.schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        if self.schedule == "interleaved" and self.stages_per_rank < 2:
            raise ConfigError("strategy.stages_per_rank", self.stages_per_rank,
                              "an integer >= 2 with schedule=interleaved")
        if self.dp not in DATA_PARALLEL:
            raise ConfigError("strategy.dp", self.dp, f"one of {', '.join(DATA_PARALLEL)} (data parallel inside "
                              "stages)")


@dataclass(frozen=True)
class ParallelConfig:
    """The layout: ranks = pp x dp_replicate x dp_shard x tp; one size may be -1, "the ranks the others leave". The
    strategy preset says how the data-parallel ranks work (ddp: replicas; fsdp: shards, and with dp_replicate > 1
    HSDP: shard within a group, replicate across groups) and which axes it runs (tp: fsdp; pp: pipeline)."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1  # tensor parallel (strategy=fsdp): heads, query groups and MLP columns split over tp ranks
    pp: int = 1  # pipeline stages (strategy=pipeline; its preset sets 2)
    sequence_parallel: bool = False  # with tp > 1: norms, dropout and residuals split along the sequence
    tp_across_nodes: bool = False  # tp groups stay inside a node unless this forces them across

    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    def validate(self) -> None:
        rest = []
        for axis, n in self.sizes().items():
            if n < 1 and n != -1:
                raise ConfigError(f"parallel.{axis}", n, "a positive integer, or -1 for the ranks the others leave")
            if n == -1:
                rest.append(axis)
        if len(rest) > 1:
            raise ConfigError(f"parallel.{rest[1]}", -1, f"a size: only one of the parallel sizes may be -1 "
                              f"(parallel.{rest[0]} is -1 already)")
