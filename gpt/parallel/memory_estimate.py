"""What one rank holds in memory, by part: `MemoryParts`, and its estimate from the config alone (the planner's fit
check, launch.planning.fit). The strategies' traits say which share of the parameters, gradients and optimizer state a
rank holds and how many layers' activations it keeps at once; the model says how large those are. Torch-free.

The estimate: the bytes per parameter the strategy's traits state (fp32 parameters and gradients, AdamW's two fp32
moments; DeepSpeed's fp32 partition beside them); activations
are the tensors autograd saves for backward, per token and layer (a pre-norm block: the two norms' fp32 inputs;
the attention's, projection's and MLP's inputs, q, k and v, the MLP's hidden twice, in the compute precision; under
train.attention=math the softmax of every head too) and the head (its input, the cross-entropy's fp32
log-probabilities and their gradient); where the parameters are sharded over data-parallel ranks, the root and one
layer gathered at a time. Activation checkpointing keeps a checkpointed layer's input only, and
recomputes one layer at a time. train.compile is counted as eager (its fused element-wise ops save fewer
intermediates). The peak counts all parts at once. Measured on CPU (benchmarks/memory_fit.py, docs/benchmarks.md) it
is a few percent low under DDP, ZeRO and FSDP, about 15% low under tensor parallelism and the GPipe pipeline (the
norms they replicate and a tied embedding on two stages are left out), and high under activation checkpointing."""
from __future__ import annotations

import math
from dataclasses import dataclass

from gpt.config.model import ModelConfig
from gpt.config.strategy import StrategyConfig
from gpt.config.train import TrainConfig
from gpt.model.flops import param_count
from gpt.parallel.layout import ParallelDims
from gpt.parallel.traits import traits_of

GIB = 2**30
PARTS = ("params", "grads", "optimizer", "activations")


@dataclass(frozen=True)
class MemoryParts:
    """Bytes one rank holds: parameters, gradients, optimizer state, activations and buffers, and the peak."""

    params: float
    grads: float
    optimizer: float
    activations: float
    peak: float

    def metrics(self) -> dict[str, float]:
        """The metrics record's fields, in GiB."""
        return {f"mem/{name}_gib": getattr(self, name) / GIB for name in (*PARTS, "peak")}

    def describe(self) -> str:
        unit, size = ("GiB", GIB) if self.peak >= GIB else ("MiB", 2**20)
        return ", ".join(f"{name} {getattr(self, name) / size:.2f}" for name in (*PARTS, "peak")) + f" {unit}"


def activation_bytes_per_token(model: ModelConfig, train: TrainConfig, tp: int = 1, sequence_parallel: bool = False
                               ) -> tuple[float, float]:
    """(bytes one layer saves for backward per token, bytes the head saves per token) on one rank, without
    activation checkpointing. Tensor parallelism splits what lies between its all-reduces; sequence parallelism
    the rest too."""
    v = 2 if train.precision in ("bf16", "fp16") else 4
    h, kv = model.n_embd, model.n_kv_head * model.head_dim
    hidden = model.mlp_hidden * (3 if model.mlp == "swiglu" else 2)
    if model.n_expert:
        hidden *= model.moe_top_k
    split = h * v + (h + 2 * kv) * v + h * v + hidden * v  # attention in, q k v, projection in, MLP in and hidden
    if train.attention == "math":
        split += model.n_head * model.block_size * v  # the softmax of every head over the sequence
    kept = 2 * h * 4  # the norms' fp32 inputs (the residual stream)
    head = h * v + model.vocab_size * 8 / tp  # the head's input; the loss's fp32 log-probabilities and their gradient
    if sequence_parallel:
        return (kept + split) / tp, head / tp
    return kept + split / tp, head


def gathered_bytes(model: ModelConfig, train: TrainConfig, dims: ParallelDims, param_fraction: float) -> float:
    """Parameters a rank gathers for its forward when they are sharded over data-parallel ranks (FSDP, ZeRO-3): the
    unsharded root (embeddings, final norm, head: kept through the step) and one layer at a time, in the compute
    precision, split over tp."""
    if param_fraction * dims.pp * dims.tp >= 1:
        return 0.0
    counts = param_count(model)
    layer = (counts["non_embedding"] - (0 if model.tie_embeddings else model.vocab_size * model.n_embd)) / model.n_layer
    root = counts["total"] - model.n_layer * layer
    v = 2 if train.precision in ("bf16", "fp16") else 4
    return v * (layer + root / dims.pp) / dims.tp


def estimate(model: ModelConfig, train: TrainConfig, strategy: StrategyConfig, dims: ParallelDims,
             micro_batch: int) -> MemoryParts:
    """One rank's memory at its peak for this model, layout, micro-batch (sequences per forward), precision and
    activation checkpointing. model.vocab_size must be known."""
    traits = traits_of(strategy.name)
    total = param_count(model)["total"]
    p_share, g_share, o_share = traits.state_shares(strategy, dims)
    p_bytes, g_bytes, o_bytes = traits.state_bytes(strategy, train.precision)
    params, grads, optimizer = p_bytes * total * p_share, g_bytes * total * g_share, o_bytes * total * o_share
    layer, head = activation_bytes_per_token(model, train, dims.tp, dims.sequence_parallel)
    tokens = micro_batch * model.block_size
    layers = traits.activation_layers(strategy, dims, model.n_layer)
    every = train.recompute_every()
    if every:  # a checkpointed layer keeps its input; one layer is recomputed whole at a time
        checkpointed = math.ceil(model.n_layer / every) / model.n_layer
        kept = 4.0 * model.n_embd / (dims.tp if dims.sequence_parallel else 1)
        activations = tokens * (layers * ((1 - checkpointed) * layer + checkpointed * kept) + layer + head)
    else:
        activations = tokens * (layers * layer + head)
    activations += gathered_bytes(model, train, dims, traits.param_fraction(strategy, dims))
    return MemoryParts(params, grads, optimizer, activations, params + grads + optimizer + activations)
