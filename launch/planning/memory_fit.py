"""Will it fit: each rank's peak memory estimated at planning (gpt.parallel.memory_estimate) against its device's
memory, before anything is submitted. A layout that cannot fit is refused in one line with the estimate and what
would fit: a smaller micro-batch, activation checkpointing, FSDP, more ranks. train.micro_batch_size=auto is chosen
here from the same estimate. Torch-free (a local GPU's memory is
asked of torch by the backend, at planning)."""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

from gpt.config.model import ModelConfig
from gpt.config.strategy import StrategyConfig
from gpt.config.train import TrainConfig
from gpt.errors import ConfigError, UserError
from gpt.parallel.layout import ParallelDims
from gpt.parallel.memory_estimate import GIB, estimate
from gpt.parallel.traits import traits_of

log = logging.getLogger(__name__)

# The share of a device's memory a rank may plan to use: the rest is for the CUDA context, the allocator's
# fragmentation, the communication buffers and what the estimate leaves out.
USABLE = 0.9


@dataclass(frozen=True)
class Device:
    """What one rank computes on ("cuda" or "cpu"), and its memory in GiB (a GPU's, or a CPU rank's share of its
    node's; None: not known), as planning resolved them once (launch.planning.plan.plan_layout_of)."""
    kind: str
    memory_gib: float | None


def fit(strategy: StrategyConfig, model: ModelConfig, train: TrainConfig, dims: ParallelDims,
        device: Device) -> TrainConfig:
    """`train`, its estimate checked against one rank's `device` for the run's `strategy`: refused (UserError) where
    it exceeds USABLE of the device's memory, logged where that is not known. train.micro_batch_size=auto is chosen
    first: the largest divisor of the per-rank batch whose estimate fits, logged in one line (none: 1, refused)."""
    auto, memory = train.micro_batch_size == "auto", device.memory_gib
    if auto and memory is None:
        raise ConfigError("train.micro_batch_size", "auto", "a positive integer or null: this device's memory is not "
                          "known, so auto cannot choose (or state it: cluster.gpu_memory_gb)")
    per_rank = train.per_rank_batch(dims.dp)
    # auto: each divisor of the per-rank batch, the largest first, down to 1; else the one asked for
    micros = [m for m in range(per_rank, 0, -1) if per_rank % m == 0] if auto else [train.micro_batches(dims.dp)[0]]
    for micro in micros:
        chosen = dataclasses.replace(train, micro_batch_size=micro) if auto else train
        parts = estimate(model, chosen, strategy, dims, micro)
        if auto and parts.peak <= USABLE * memory * GIB:
            log.info("train.micro_batch_size=auto: %d of a per-rank batch of %d; each rank about %.2f GiB at its "
                     "peak (%s), within %.0f%% of the %.1f GiB of its %s (%.0f%% headroom)", micro, per_rank,
                     parts.peak / GIB, parts.describe(), USABLE * 100, memory, what_device(device),
                     (1 - USABLE) * 100)
            break
    if memory is None:
        log.info("memory per rank: about %.2f GiB (%s); the device's memory is not known, so it is not checked "
                 "(state it: %s)", parts.peak / GIB, parts.describe(),
                 "cluster.gpu_memory_gb" if device.kind == "cuda" else "cluster.mem")
        return chosen
    usable = USABLE * memory * GIB
    if parts.peak > usable:
        raise UserError(f"this layout does not fit: each rank needs about {parts.peak / GIB:.2f} GiB at its peak "
                        f"({parts.describe()}), more than {USABLE:.0%} of the {memory:.1f} GiB of its "
                        f"{what_device(device)}; what would fit: "
                        f"{'; '.join(would_fit(strategy, model, chosen, dims, usable)) or 'a smaller model'}")
    return chosen


def what_device(device: Device) -> str:
    return "GPU" if device.kind == "cuda" else "CPU rank's share of its node"


def would_fit(strategy: StrategyConfig, model: ModelConfig, train: TrainConfig, dims: ParallelDims,
              usable: float) -> list[str]:
    """The changes that bring the estimate under `usable` bytes, each on its own."""
    out = []
    micro, _ = train.micro_batches(dims.dp)
    smaller = [m for m in range(micro - 1, 0, -1) if micro % m == 0 and estimate(
        model, dataclasses.replace(train, micro_batch_size=m), strategy, dims, m).peak <= usable]
    if smaller:
        out.append(f"train.micro_batch_size={smaller[0]}")
    if train.activation_checkpointing != "full":
        recomputed = dataclasses.replace(train, activation_checkpointing="full")
        if estimate(model, recomputed, strategy, dims, micro).peak <= usable:
            out.append("train.activation_checkpointing=full")
    if traits_of(strategy.name).state_shares(strategy, dims) != (1 / dims.world_size,) * 3:
        sharded = ParallelDims(dp_shard=dims.world_size)
        try:
            micro, _ = train.micro_batches(sharded.dp)
        except ConfigError:  # the global batch does not split over every rank
            return out
        parts = estimate(model, train, dataclasses.replace(strategy, name="fsdp"), sharded, micro)
        if parts.peak <= usable:
            out.append(f"strategy=fsdp on these {dims.world_size} ranks")
        elif parts.activations < usable:  # states shrink with the ranks, activations per rank do not
            states = parts.params + parts.grads + parts.optimizer
            ranks = math.ceil(states * dims.world_size / (usable - parts.activations))
            out.append(f"strategy=fsdp on at least {ranks} ranks")
    return out
