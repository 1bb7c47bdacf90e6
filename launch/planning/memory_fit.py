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
from gpt.parallel.memory_estimate import GIB, MemoryParts, estimate
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
    """`train` with train.micro_batch_size=auto chosen (fit_micro_batch), once its estimate is checked (check_fit)
    against one rank's `device`, for the run's `strategy`."""
    train, micro = fit_micro_batch(strategy, model, train, dims, device)
    check_fit(strategy, model, train, dims, device, micro)
    return train


def fit_micro_batch(strategy: StrategyConfig, model: ModelConfig, train: TrainConfig, dims: ParallelDims,
                    device: Device) -> tuple[TrainConfig, int]:
    """train.micro_batch_size=auto: the largest divisor of the per-rank batch whose estimate fits USABLE of the
    device's memory, logged in one line; 1 when none does (check_fit then refuses it). Other values as they are.
    Returns `train` so resolved and its sequences per rank per forward."""
    if train.micro_batch_size != "auto":
        return train, train.micro_batches(dims.dp)[0]
    memory = device.memory_gib
    if memory is None:
        raise ConfigError("train.micro_batch_size", "auto", "a positive integer or null: this device's memory is not "
                          "known, so auto cannot choose (or state it: cluster.gpu_memory_gb)")
    per_rank = train.per_rank_batch(dims.dp)
    for micro in (m for m in range(per_rank, 0, -1) if per_rank % m == 0):
        chosen = dataclasses.replace(train, micro_batch_size=micro)
        parts = estimate(model, chosen, strategy, dims, micro)
        if parts.peak <= USABLE * memory * GIB:
            log.info("train.micro_batch_size=auto: %d of a per-rank batch of %d; each rank about %.2f GiB at its "
                     "peak (%s), within %.0f%% of the %.1f GiB of its %s (%.0f%% headroom)", micro, per_rank,
                     parts.peak / GIB, parts.describe(), USABLE * 100, memory, what_device(device),
                     (1 - USABLE) * 100)
            return chosen, micro
    return dataclasses.replace(train, micro_batch_size=1), 1


def what_device(device: Device) -> str:
    return "GPU" if device.kind == "cuda" else "CPU rank's share of its node"


def check_fit(strategy: StrategyConfig, model: ModelConfig, train: TrainConfig, dims: ParallelDims,
              device: Device, micro: int) -> MemoryParts:
    """The estimate of one rank's memory at `micro` sequences per forward; a ConfigError when it exceeds USABLE of
    the device's memory."""
    parts = estimate(model, train, strategy, dims, micro)
    memory = device.memory_gib
    if memory is None:
        log.info("memory per rank: about %.2f GiB (%s); the device's memory is not known, so it is not checked "
                 "(state it: %s)", parts.peak / GIB, parts.describe(),
                 "cluster.gpu_memory_gb" if device.kind == "cuda" else "cluster.mem")
        return parts
    usable = USABLE * memory * GIB
    if parts.peak > usable:
        raise UserError(f"this layout does not fit: each rank needs about {parts.peak / GIB:.2f} GiB at its peak "
                        f"({parts.describe()}), more than {USABLE:.0%} of the {memory:.1f} GiB of its "
                        f"{what_device(device)}; what "
                        f"would fit: {'; '.join(would_fit(strategy, model, train, dims, usable)) or 'a smaller model'}")
    return parts


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
