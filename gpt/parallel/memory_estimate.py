"""What one rank holds in memory, by part: `MemoryParts`, and its estimate from the config alone (the planner's fit
check, launch.planning.memory_fit). The strategies' traits say which share of the parameters, gradients and optimizer
state a rank holds and how many layers' activations it keeps at once; the model says how large those are. Torch-free.

The estimate: the bytes per parameter the strategy's traits state (fp32 parameters and gradients, AdamW's two fp32
moments; DeepSpeed's fp32 partition beside them), of the parameters of the rank holding the most (the norms tensor
parallelism replicates, a pipeline's tied embedding on its first and last stage; ZeRO-1's optimizer state, of the
whole parameters its partition gives that rank); activations are the tensors autograd saves for backward, per
token and layer (a pre-norm block: the two norms' inputs, the residual stream, fp32 or train.residual_dtype; the
projections' inputs, q, k and v, the MLP's hidden, in the compute precision, eager and compiled apart:
activation_bytes_per_token;
under train.attention=math the softmax of every head too), the head at the start of backward (its input, the
cross-entropy's fp32 rows), autocast's compute-precision copies of the weights, and a pipeline stage's input and
output per micro-batch in flight; where the parameters are
sharded over data-parallel ranks, the root and one layer gathered at a time (a pipeline's FSDP stage: all of it,
from its first backward to the step's end; train.fp8_all_gather's float8 layers at a byte a value);
train.fused_qkv's joined q, k and v weight where autocast makes no copies (fp32, FSDP's gathered weights); with
gradient accumulation, the gradients as a rank holds them between micro-steps (FSDP and a pipeline's FSDP stage:
unsharded, in fp32; traits.accumulating_grad_share).
Activation checkpointing keeps a checkpointed layer's input only, and recomputes one layer at a time. The peak counts
all parts at once. Measured on CPU (benchmarks/memory_fit.py, docs/results.md) against what each rank held, and
calibrated against CUDA's peaks on GPUs (tests/gpt/parallel/test_memory_calibration.py, docs/profiling.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from gpt.config.model import ModelConfig
from gpt.config.strategy import StrategyConfig
from gpt.config.train import TrainConfig
from gpt.model.flops import norm_params, param_count
from gpt.model.float8 import float8_layers
from gpt.model.shapes import parameter_shapes
from gpt.parallel.layout import ParallelDims, split_layers
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


def activation_bytes_per_token(model: ModelConfig, train: TrainConfig, tp: int = 1, sequence_parallel: bool = False,
                               fused_loss: bool = False) -> tuple[float, float]:
    """(bytes one layer saves for backward per token, bytes the head holds per token at the peak) on one rank,
    without activation checkpointing. Tensor parallelism splits what lies between its all-reduces; sequence
    parallelism the rest too. fused_loss: the head and loss compiled with the model (train.compile_scope).
    Calibrated on one H200 (docs/profiling.md, "Will it fit")."""
    v = 2 if train.compute_precision in ("bf16", "fp16") else 4
    h, kv = model.n_embd, model.n_kv_head * model.head_dim
    swiglu = model.mlp == "swiglu"
    # Eager, the MLP's hidden is saved by each op that reads it (GELU: its input and output; SwiGLU: the gate, its
    # SiLU, the up projection and their product); compiled, Inductor recomputes an element-wise op from the one
    # tensor it saves (GELU's output from its input) and keeps the rest (SwiGLU: the gate, up and their product)
    hidden = model.mlp_hidden * ((3 if swiglu else 1) if train.compile else (4 if swiglu else 2))
    if model.n_expert:
        hidden *= model.moe_top_k
    # the projections' inputs, whole on every rank (gathered from the sequence shards under sequence parallel):
    # eager autocast casts the norm's fp32 output once per projection that reads it (q, k, v; the MLP's one or two),
    # compiled the cast is one; without autocast the norm's output itself
    casts = 3 + (2 if swiglu else 1) if v < 4 and not train.compile else 2
    whole = casts * h * v
    # q, k and v, the projection's input and the MLP's hidden are split
    split = (h + 2 * kv) * v + h * v + hidden * v
    if train.attention == "math":
        split += model.n_head * model.block_size * v  # the softmax of every head over the sequence
    kept = 2 * h * (2 if train.residual_dtype == "bf16" else 4)  # the norms' inputs: the residual stream
    # the head: its input (and, eager, the final norm's fp32 input); at the start of backward the loss's fp32
    # log-probabilities, their gradient and the logits' fp32 gradient at once, eager; compiled with the model, the
    # fused loss holds two fp32 vocabulary-wide rows
    head = h * v + (model.vocab_size * 8 if fused_loss else model.vocab_size * 12 + 4 * h) / tp
    return (kept / tp if sequence_parallel else kept) + whole + split / tp, head


def rank_params(model: ModelConfig, counts: dict[str, int], strategy: StrategyConfig, dims: ParallelDims) -> float:
    """Parameters of the rank that holds the most, before any data-parallel sharding. Tensor parallelism splits the
    projections, the embedding and the head, and replicates the norms, the row-parallel biases and learned
    positions; a pipeline's first stage holds the embeddings and its last the final norm and the head (a tied
    embedding's second copy), the first stages one layer more where the layers do not divide evenly. `counts`: the
    model's parameters by part (gpt.model.flops.param_count)."""
    tp = dims.tp
    norm, head = norm_params(model), model.vocab_size * model.n_embd
    final_norm = norm if model.norm_position == "pre" else 0
    positions = counts["embedding"] - head
    layer = (counts["non_embedding"] - final_norm - (0 if model.tie_embeddings else head)) / model.n_layer
    whole = 2 * norm + (2 * model.n_embd if model.bias else 0)  # the norms and the row-parallel biases
    layer = whole + (layer - whole) / tp
    if dims.pp == 1:
        return model.n_layer * layer + positions + final_norm + head / tp * (1 if model.tie_embeddings else 2)
    stages = dims.pp * (strategy.stages_per_rank if strategy.schedule == "interleaved" else 1)
    runs = split_layers(model.n_layer, stages)
    first, last = head / tp + positions, head / tp + final_norm
    return max(sum(len(runs[s]) * layer + (first if s == 0 else 0) + (last if s == stages - 1 else 0)
                   for s in range(p, stages, dims.pp)) for p in range(dims.pp))


def float8_gathered(model: ModelConfig, train: TrainConfig) -> int:
    """Values of the weights train.fp8_all_gather gathers in float8, a byte each where bf16 takes two: the float8
    layers' (gpt.model.float8.float8_layers), the whole model's."""
    return float8_weights(model, train.fp8_recipe) if train.fp8_all_gather else 0


def float8_weights(model: ModelConfig, recipe: str) -> int:
    """Values of the weights float8 training converts under `recipe`."""
    layers = {f"{name}.weight" for name in float8_layers(model, recipe)}
    return sum(math.prod(shape) for name, shape in parameter_shapes(model) if name in layers)


def gathered_bytes(model: ModelConfig, counts: dict[str, int], train: TrainConfig, dims: ParallelDims,
                   param_fraction: float, whole: float | None = None) -> float:
    """Parameters a rank gathers for its forward when they are sharded over data-parallel ranks (FSDP, ZeRO-3): the
    unsharded root (embeddings, final norm, head: kept through the step) and one layer at a time, in the compute
    precision, split over tp; or, where the strategy keeps them all gathered, the `whole` of the rank's."""
    if param_fraction * dims.pp * dims.tp >= 1:
        return 0.0
    v = 2 if train.compute_precision in ("bf16", "fp16") else 4
    fp8 = float8_gathered(model, train)
    if whole is not None:
        return v * whole - (v - 1) * fp8 * whole / counts["total"]
    layer = (counts["non_embedding"] - (0 if model.tie_embeddings else model.vocab_size * model.n_embd)) / model.n_layer
    root = counts["total"] - model.n_layer * layer
    return (v * (layer + root / dims.pp) - (v - 1) * fp8 / model.n_layer) / dims.tp


def estimate(model: ModelConfig, train: TrainConfig, strategy: StrategyConfig, dims: ParallelDims,
             micro_batch: int, at_update: bool = False) -> MemoryParts:
    """One rank's memory at its peak for this model, layout, micro-batch (sequences per forward), precision and
    activation checkpointing; `at_update`: its gradients as the update reads them, once reduced. model.vocab_size
    must be known."""
    # what the strategy's traits say, then the sizes they are shares of
    traits = traits_of(strategy.name)
    p_share, g_share, _ = traits.state_shares(strategy, dims)
    o_share = traits.optimizer_share(strategy, dims, model)
    # gradient accumulation: the gradients as a rank holds them between the micro-steps
    accumulating = 0.0 if at_update else traits.accumulating_grad_share(
        strategy, dims, train.global_batch_size // dims.dp > micro_batch)
    p_bytes, g_bytes, o_bytes = traits.state_bytes(strategy, train.compute_precision)
    layers = traits.activation_layers(strategy, dims, model.n_layer)
    fused_loss = train.compile and traits.compile_scope(train) == "model"
    fraction = traits.param_fraction(strategy, dims)
    padding = traits.padding(strategy, dims, model)
    p_share, g_share, o_share = p_share * padding, max(g_share * padding, accumulating), o_share * padding
    counts = param_count(model)
    layer, head = activation_bytes_per_token(model, train, dims.tp, dims.sequence_parallel, fused_loss)
    stage = rank_params(model, counts, strategy, dims)
    whole = stage if traits.gathers_whole(strategy, dims) else None
    gathered = gathered_bytes(model, counts, train, dims, fraction, whole)
    held = stage * dims.pp * dims.tp  # the traits' shares divide by pp and tp
    params, grads, optimizer = p_bytes * held * p_share, g_bytes * held * g_share, o_bytes * held * o_share
    tokens = micro_batch * model.block_size
    every = train.recompute_every()
    checkpointed = math.ceil(model.n_layer / every) / model.n_layer if every else 0.0
    if every:  # a checkpointed layer keeps its input (the residual stream); one layer is recomputed whole at a time
        residual = 2 if train.residual_dtype == "bf16" else 4
        kept = residual * model.n_embd / (dims.tp if dims.sequence_parallel else 1)
        activations = tokens * (layers * ((1 - checkpointed) * layer + checkpointed * kept) + layer + head)
    else:
        activations = tokens * (layers * layer + head)
    if dims.pp > 1:  # each micro-batch in flight keeps its stage's input and output, sent in the compute dtype
        sent = 2 if train.compute_precision in ("bf16", "fp16") else 4  # (gpt.parallel.pipeline.StageGPT)
        activations += tokens * layers * dims.pp / model.n_layer * 2 * model.n_embd * sent
    compute = 2 if train.compute_precision in ("bf16", "fp16") else 4
    if not gathered and compute < p_bytes:  # autocast's copies of the weights, each saved by its matmul
        activations += compute * held * p_share
    elif train.fused_qkv:  # the joined q, k and v weight each layer's matmul saves (autocast's copies stand in for it)
        qkv = (model.n_embd + 2 * model.n_kv_head * model.head_dim) * model.n_embd
        activations += compute * qkv * layers * (1 - checkpointed)
    activations += gathered
    return MemoryParts(params, grads, optimizer, activations, params + grads + optimizer + activations)
