"""What each strategy preset is, for the code outside gpt/parallel: its checkpoint format and whether that
reshards, the share of the parameters a rank holds, and the collectives of one step with their sizes and mesh axis.
The trainer, the checkpoint code, the performance model and the report ask these, never a strategy's name.

Torch-free and computed from the config alone, so a report can be rebuilt offline from a run folder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gpt.errors import ConfigError
from gpt.parallel.layout import ParallelDims, read_dims, refuse_axes


@dataclass(frozen=True)
class Collective:
    kind: str        # all_reduce, all_gather, reduce_scatter or p2p (what the performance model knows)
    bytes: float     # bytes of the whole tensor each call set moves per step (before the bus-bandwidth factor)
    calls: int       # calls per step (each pays latency)
    axis: str        # the mesh axis its group runs on: pp, dp (dp_replicate x dp_shard), dp_replicate, dp_shard, tp
    what: str = ""


@dataclass(frozen=True)
class Workload:
    """What sizes a step's communication: the model and the batch."""

    params: int
    n_layer: int
    n_embd: int
    block_size: int
    global_batch: int
    precision: str = "fp32"

    @property
    def value_bytes(self) -> int:
        return 2 if self.precision in ("bf16", "fp16") else 4

    def activation_bytes(self, dims: ParallelDims) -> float:
        """One layer's activations of one replica's batch (what tp reduces and pp sends)."""
        return self.global_batch / dims.dp * self.block_size * self.n_embd * self.value_bytes


def _buckets(nbytes: float, bucket_bytes: float) -> int:
    return max(1, math.ceil(nbytes / bucket_bytes))


class Preset:
    """Replicas that all-reduce gradients (DDP); subclasses change what differs."""

    name = "ddp"
    data_axis = "dp_replicate"
    axes: tuple[str, ...] = ("dp_replicate", "dp_shard")
    checkpoint_format = "dcp"  # DCP: every rank writes its part; loads into any layout
    reshardable = True

    def layout(self, cfg: Any, parallel: Any, world_size: int) -> ParallelDims:
        dims = read_dims(parallel, world_size)
        refuse_axes(dims, self.name, self.axes)
        return ParallelDims(**{self.data_axis: dims.dp})

    def param_fraction(self, cfg: Any, dims: ParallelDims) -> float:
        """The share of the model's parameters one rank holds."""
        return 1.0

    def collectives(self, cfg: Any, dims: ParallelDims, w: Workload) -> list[Collective]:
        if dims.dp == 1:
            return []
        grads = 4.0 * w.params  # gradients reduced in fp32
        bucket = float(cfg.get("bucket_cap_mb", 25)) * 2**20
        return [Collective("all_reduce", grads, _buckets(grads, bucket), "dp", "fp32 gradients, in buckets")]


class Single(Preset):
    name = "single"
    axes = ()


class Zero1(Preset):
    name = "zero1"
    data_axis = "dp_shard"

    def collectives(self, cfg, dims, w):
        if dims.dp == 1:
            return []
        return [*super().collectives(cfg, dims, w),
                Collective("all_gather", 4.0 * w.params, 1, "dp", "updated parameter partitions")]


class DeepSpeed(Preset):
    name = "deepspeed"
    data_axis = "dp_shard"
    checkpoint_format = "deepspeed"  # the engine's own files, tied to the world size that wrote them
    reshardable = False

    def param_fraction(self, cfg, dims):
        return 1.0 / dims.dp if int(cfg.get("stage", 2)) == 3 else 1.0

    def collectives(self, cfg, dims, w):
        if dims.dp == 1:
            return []
        stage, grads = int(cfg.get("stage", 2)), 4.0 * w.params
        calls = _buckets(grads, float(cfg.get("reduce_bucket_size", 5e7)) * 4)
        if stage < 3:
            return [Collective("all_reduce", grads, calls, "dp", f"ZeRO-{stage} gradient reduction")]
        return [Collective("all_gather", 2 * grads, calls * w.n_layer, "dp", "parameters, forward and backward"),
                Collective("reduce_scatter", grads, calls * w.n_layer, "dp", "gradients")]


class FSDP(Preset):
    name = "fsdp"
    data_axis = "dp_shard"
    axes = ("dp_replicate", "dp_shard", "tp")

    def layout(self, cfg, parallel, world_size):
        dims = read_dims(parallel, world_size)
        refuse_axes(dims, self.name, self.axes)
        return dims

    def param_fraction(self, cfg, dims):
        return 1.0 / (dims.dp_shard * dims.tp)

    def collectives(self, cfg, dims, w):
        local = w.params / dims.tp  # each tp rank shards its own part over dp_shard
        out = []
        if dims.dp_shard > 1:
            gathers = 2 if cfg.get("reshard_after_forward", True) else 1
            units = w.n_layer + 1
            out += [Collective("all_gather", gathers * w.value_bytes * local, gathers * units, "dp_shard",
                               "parameters of each layer"),
                    Collective("reduce_scatter", 4.0 * local, units, "dp_shard", "fp32 gradients of each layer")]
        if dims.dp_replicate > 1:
            out.append(Collective("all_reduce", 4.0 * local / dims.dp_shard, w.n_layer + 1, "dp_replicate",
                                  "gradient shards across replicas (HSDP)"))
        if dims.tp > 1:
            act = w.activation_bytes(dims)
            calls = 4 * w.n_layer + 2  # attention and MLP, forward and backward; embedding and head
            if dims.sequence_parallel:  # each all-reduce split into its two halves around the sequence-sharded part
                out += [Collective("all_gather", calls * act, calls, "tp", "sequence-sharded activations"),
                        Collective("reduce_scatter", calls * act, calls, "tp", "partial activations")]
            else:
                out.append(Collective("all_reduce", calls * act, calls, "tp", "partial activations"))
        return out


class Pipeline(Preset):
    name = "pipeline"
    axes = ("pp", "dp_replicate", "dp_shard", "tp")

    def layout(self, cfg, parallel, world_size):
        pp = int(cfg.get("pp", 2))
        if parallel.get("pp", 1) not in (1, pp):
            raise ConfigError("parallel.pp", parallel.get("pp"), f"1 or strategy.pp={pp}: strategy.pp sets the "
                              "stages of strategy=pipeline")
        dims = read_dims(parallel, world_size, pp=pp)
        refuse_axes(dims, self.name, self.axes)
        if dims.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel", True, "false with strategy=pipeline (a later stage "
                              "would take its RoPE positions from its slice of the sequence)")
        inside = "dp_shard" if cfg.get("dp", "ddp") == "fsdp" else "dp_replicate"
        if dims.tp > 1 and dims.dp > 1 and inside == "dp_replicate":
            raise ConfigError("strategy.dp", cfg.get("dp", "ddp"), "fsdp with parallel.tp > 1 (DDP does not take "
                              "the tensor-parallel DTensor parameters; FSDP2 does)")
        return ParallelDims(pp=pp, tp=dims.tp, **{inside: dims.dp})

    def param_fraction(self, cfg, dims):
        return 1.0 / (dims.pp * dims.dp_shard * dims.tp)

    def collectives(self, cfg, dims, w):
        stage = 4.0 * w.params / dims.pp / dims.tp
        out = []
        if dims.dp > 1:
            bucket = float(cfg.get("bucket_cap_mb", 25)) * 2**20
            out.append(Collective("all_reduce", stage, _buckets(stage, bucket), "dp", "each stage's gradients"))
        if dims.tp > 1:
            calls = 4 * w.n_layer // dims.pp + 1  # this stage's layers, forward and backward; embedding or head
            out.append(Collective("all_reduce", calls * w.activation_bytes(dims), calls, "tp",
                                  "partial activations"))
        if dims.pp > 1:
            micro = int(cfg.get("microbatches", dims.pp))
            out.append(Collective("p2p", 2 * w.activation_bytes(dims), 2 * micro, "pp",
                                  "activations forward, their gradients backward"))
        return out


PRESETS: dict[str, Preset] = {p.name: p for p in (Single(), Preset(), Zero1(), DeepSpeed(), FSDP(), Pipeline())}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError("strategy", name, f"one of {', '.join(PRESETS)}")
    return PRESETS[name]


def saved_format(meta: dict[str, Any]) -> str:
    """The checkpoint format a checkpoint's metadata names (older checkpoints: that of the strategy that wrote it)."""
    return meta.get("checkpoint_format") or preset(meta.get("strategy") or "single").checkpoint_format
