"""The strategy registry, and what each strategy is, for the code outside gpt/parallel. Each strategy registers
one traits class here (`@register`): its name (strategy=NAME), its implementation (a module of gpt/parallel), the
strategy.* keys it reads, what its preset sets, and its traits: what it needs of the run (checked before anything
runs), its checkpoint format and whether that reshards, the share of the parameters a rank holds, and the
collectives of one step with their sizes and mesh axis. The planner, the config, the trainer, the checkpoint code,
the performance model and the report ask these, never a strategy's name. A new strategy is its module and its
traits class here (docs/strategies.md).

Torch-free and computed from the config alone, so the launcher plans on a login node and a report can be rebuilt
offline from a run folder.
"""
from __future__ import annotations

import heapq
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

from gpt.config.model import ModelConfig
from gpt.config.parse import only_own_keys
from gpt.config.strategy import ParallelConfig, StrategyConfig
from gpt.config.train import CUDA_GRAPH_MODES, TrainConfig
from gpt.errors import ConfigError, UserError
from gpt.model.shapes import parameter_shapes
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
    reduce_dtype: str = "fp32"  # train.reduce_dtype
    float8_gathered: int = 0  # parameter values train.fp8_all_gather gathers in float8, a byte each (whole model)

    @property
    def value_bytes(self) -> int:
        """Bytes of a parameter or activation in the compute precision (fp8's unconverted layers run bf16)."""
        return 2 if self.precision in ("bf16", "fp16", "fp8") else 4

    @property
    def grad_bytes(self) -> int:
        """Bytes of a gradient as data-parallel ranks reduce it."""
        return 2 if self.reduce_dtype == "bf16" else 4

    def activation_bytes(self, dims: ParallelDims) -> float:
        """One layer's activations of one replica's batch (what tp reduces and pp sends)."""
        return self.global_batch / dims.dp * self.block_size * self.n_embd * self.value_bytes


# DDP's first gradient bucket, in MiB (torch.distributed._DEFAULT_FIRST_BUCKET_BYTES)
FIRST_BUCKET_MB = 1


def _buckets(nbytes: float, bucket_bytes: float) -> int:
    return max(1, math.ceil(nbytes / bucket_bytes))


def device_type(train: TrainConfig | None) -> str:
    """The device type a run will use, as far as the planner can tell ('cuda' or 'cpu'). The planner hands over
    train.device resolved; `auto` asks this machine (importing torch)."""
    requested = train.device if train is not None else "auto"
    if requested == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def check_fsdp_options(strategy: StrategyConfig, train: TrainConfig | None) -> None:
    """Options a device cannot run: CPU offload moves parameters off a GPU, so it needs one; and it moves each shard
    back with .to(device), which makes torchao's float8-castable weight anew, without its precomputed scale."""
    if strategy.cpu_offload and train is not None and device_type(train) != "cuda":
        raise ConfigError("strategy.cpu_offload", True, "false on a CPU run (offloading moves parameters from a GPU "
                          "to the CPU); set train.device=cuda on a GPU machine to use it")
    if strategy.cpu_offload and train is not None and train.fp8_all_gather:
        raise ConfigError("train.fp8_all_gather", True, "false with strategy.cpu_offload=true (each shard comes back "
                          "from the CPU as a new weight without its float8 scale: every gather would all-reduce its "
                          "own)")


def check_compile(model: ModelConfig, train: TrainConfig | None) -> None:
    """train.compile compiles each block with fullgraph, one graph shared by every block; a mixture-of-experts block
    reads its experts' token counts to the host (tolist) to split the tokens, sizes the shared graph cannot carry
    from block to block (pytorch/pytorch#161276; torchtitan compiles MoE blocks without fullgraph)."""
    if train is not None and train.compile and model.n_expert:
        raise ConfigError("train.compile", True, f"false with model.n_expert={model.n_expert} (a mixture-of-experts "
                          "block reads its expert counts to the host, which the compiled blocks' shared graph does not "
                          "carry), or model.n_expert=0 to compile")


def _most_partitioned(model: ModelConfig, ranks: int) -> int:
    """Parameters of the rank that gets the most under ZeroRedundancyOptimizer's partition (torch 2.13,
    _partition_parameters): per parameter group, largest first, each to the rank with the fewest so far, the lowest
    rank on a tie; the counts carry over from one group to the next."""
    shapes = [shape for _, shape in parameter_shapes(model)]
    held = [(0, rank) for rank in range(ranks)]  # a heap: the fewest first, then the lowest rank
    for matrices in (True, False):
        for size in sorted((math.prod(s) for s in shapes if (len(s) >= 2) == matrices), reverse=True):
            count, rank = heapq.heappop(held)
            heapq.heappush(held, (count + size, rank))
    return max(count for count, _ in held)


REGISTRY: dict[str, StrategyTraits] = {}  # strategy.name -> its traits: the one list of strategies


def register(cls: type[StrategyTraits]) -> type[StrategyTraits]:
    """Make a strategy selectable (strategy=NAME: the Hydra option gpt.config.schema stores from this registry),
    planned (its traits) and buildable (its implementation, imported when a rank builds it)."""
    REGISTRY[cls.name] = cls()
    return cls


def traits_of(name: str) -> StrategyTraits:
    if name not in REGISTRY:
        raise ConfigError("strategy", name, f"one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


class StrategyTraits:
    """What a strategy is, described for the code outside gpt/parallel. A strategy registers a subclass (register)
    that names it, its implementation and the strategy.* keys it reads; the defaults here describe plain replicas
    that hold the whole model, and each subclass changes what differs."""

    name: str
    implementation: str  # "module:Class", a gpt.parallel.base.Strategy: imported only when a rank builds one
    keys: tuple[str, ...] = ()  # the strategy.* keys it reads (their defaults: gpt.config.strategy.StrategyConfig)
    preset: dict[str, Any] = {}  # what strategy=NAME sets besides strategy.name, e.g. {"parallel": {"pp": 2}}
    data_axis = "dp_replicate"
    axes: tuple[str, ...] = ("dp_replicate", "dp_shard")
    checkpoint_format = "dcp"  # DCP: every rank writes its part; loads into any layout
    reshardable = True
    # The strategy.* keys its checkpoint files depend on, recorded in meta.json (strategy_keys) for check_loadable
    checkpoint_keys: tuple[str, ...] = ()
    # train.compile may cover the whole model with its loss: no per-block hooks (FSDP's, tensor parallelism's) and
    # a rank runs the whole model (not a pipeline stage)
    whole_model_compile = True
    # Why train.compile_mode's CUDA graphs cannot replay this strategy's compiled code (None: they can)
    no_cuda_graphs: str | None = None
    # Why the dry run (launch.dry_run, gpt.train.dry_build) cannot build this strategy (None: it can)
    no_dry_run: str | None = None
    # Why train.precision=fp8 (torchao's float8 linear layers) cannot run in this strategy (None: it can)
    no_fp8: str | None = None
    # Why train.reduce_dtype=bf16 cannot apply: no gradients reduced across ranks (None: they are, and it can)
    no_reduce_dtype: str | None = None
    # Why train.residual_dtype=bf16 cannot apply (None: it can)
    no_bf16_residual: str | None = None
    # Whether each step all-gathers sharded parameters (train.fp8_all_gather can gather them in float8)
    gathers_parameters = False

    def reduces_with_ddp(self, strategy: StrategyConfig) -> bool:
        """Whether DDP reduces this strategy's gradients (train.reduce_dtype=bf16: torch's bf16 compress hook)."""
        return False

    def check_precision(self, train: TrainConfig, strategy: StrategyConfig, parallel: ParallelConfig) -> None:
        """Refuse, at planning, train.precision=fp8 and train.reduce_dtype=bf16 where this layout cannot honour
        them. torchao's float8 under tensor parallelism needs its own plans (Float8ColwiseParallel, ...), which
        gpt.parallel.tensor does not apply. torch registers DDP's bf16 compress hook only over NCCL (or XCCL)."""
        if train.precision == "fp8" and (self.no_fp8 or parallel.tp > 1):
            why = self.no_fp8 or ("tensor parallelism (parallel.tp > 1) would need torchao's float8 tensor-parallel "
                                  "plans, not applied here")
            raise ConfigError("train.precision", "fp8", f"bf16 with strategy={self.name} ({why}); fp8 with single, "
                              "ddp, zero1 or fsdp without tensor parallelism")
        if train.fp8_all_gather and not self.gathers_parameters:
            raise ConfigError("train.fp8_all_gather", True, f"false with strategy={self.name} (it gathers no "
                              "parameters: float8 all-gathers are FSDP's, strategy=fsdp)")
        if train.reduce_dtype == "fp32":
            return
        if self.no_reduce_dtype:
            raise ConfigError("train.reduce_dtype", train.reduce_dtype, f"fp32 with strategy={self.name} "
                              f"({self.no_reduce_dtype})")
        if self.reduces_with_ddp(strategy) and device_type(train) == "cpu":
            raise ConfigError("train.reduce_dtype", train.reduce_dtype, f"fp32 with strategy={self.name} on a CPU "
                              "run (torch's bf16 compress hook for DDP needs NCCL, a GPU run); or strategy=fsdp")

    def check_compute(self, train: TrainConfig, strategy: StrategyConfig, parallel: ParallelConfig) -> None:
        """Refuse, at planning, train.fused_qkv where q, k and v are not whole on the rank as its forward runs, and
        train.residual_dtype=bf16 where this strategy cannot hold it."""
        if train.fused_qkv and parallel.tp > 1:
            raise ConfigError("train.fused_qkv", True, "false with tensor parallelism (parallel.tp > 1 shards q, k "
                              "and v by heads, each its own way)")
        if train.residual_dtype == "bf16" and self.no_bf16_residual:
            raise ConfigError("train.residual_dtype", "bf16", f"fp32 with strategy={self.name} "
                              f"({self.no_bf16_residual})")

    def check_compile_mode(self, train: TrainConfig) -> None:
        """Refuse, at planning, a compile mode that runs CUDA graphs (on a GPU) where this strategy cannot."""
        graphs = train.compile and train.device == "cuda" and train.compile_mode in CUDA_GRAPH_MODES
        if graphs and self.no_cuda_graphs:
            raise ConfigError("train.compile_mode", train.compile_mode, f"default with strategy={self.name} "
                              f"({self.no_cuda_graphs}); {train.compile_mode} with single, ddp or zero1")

    def compile_scope(self, train: TrainConfig) -> str:
        """What train.compile covers in this run: 'model' (the GPT with its loss, one graph) or 'blocks'."""
        scope = train.compile_scope
        if scope == "model" and not self.whole_model_compile:
            raise ConfigError("train.compile_scope", scope, f"blocks or auto with strategy={self.name} (it compiles "
                              "each block: its hooks are per block); model with single, ddp or zero1")
        return "model" if scope == "model" or (scope == "auto" and self.whole_model_compile) else "blocks"

    def data_parallel_size(self, strategy: StrategyConfig, parallel: ParallelConfig, model: ModelConfig,
                           world_size: int, train: TrainConfig | None = None) -> int:
        """Check what the preset needs of the run before anything runs; return how many replicas read different
        data. train is None in a rank (the planner checked it). Raises ConfigError naming the key, the value and
        what would be valid."""
        return world_size

    def layout(self, strategy: StrategyConfig, parallel: ParallelConfig, world_size: int) -> ParallelDims:
        dims = read_dims(parallel, world_size)
        refuse_axes(dims, self.name, self.axes)
        return ParallelDims(**{self.data_axis: dims.dp})

    def param_fraction(self, strategy: StrategyConfig, dims: ParallelDims) -> float:
        """The share of the model's parameters one rank holds."""
        return 1.0

    def state_bytes(self, strategy: StrategyConfig, precision: str) -> tuple[int, int, int]:
        """Bytes per parameter of the parameters, gradients and optimizer state (before the shares): fp32 weights
        and gradients (autocast keeps fp32 weights), AdamW's two fp32 moments."""
        return 4, 4, 8

    def state_shares(self, strategy: StrategyConfig, dims: ParallelDims) -> tuple[float, float, float]:
        """The shares of the model's parameters, gradients and optimizer state one rank holds (the planner's memory
        estimate, gpt.parallel.memory_estimate)."""
        share = self.param_fraction(strategy, dims)
        return share, share, share

    def optimizer_share(self, strategy: StrategyConfig, dims: ParallelDims, model: ModelConfig) -> float:
        """The share of the model's optimizer state held by the rank that holds the most: state_shares', where the
        state splits evenly."""
        return self.state_shares(strategy, dims)[2]

    def padding(self, strategy: StrategyConfig, dims: ParallelDims, model: ModelConfig) -> float:
        """How much more than the even share state_shares says the rank that holds the most holds of each part, where
        the strategy splits every tensor in padded chunks."""
        return 1.0

    def accumulating_grad_share(self, strategy: StrategyConfig, dims: ParallelDims, micro_steps: bool) -> float:
        """The share of the model's gradients a rank holds between the micro-steps of gradient accumulation (0 where
        a step is one micro-step): the step's (state_shares), where they accumulate in place."""
        return self.state_shares(strategy, dims)[1] if micro_steps else 0.0

    def gathers_whole(self, strategy: StrategyConfig, dims: ParallelDims) -> bool:
        """Whether a rank holds all its sharded parameters gathered through its backward, not one layer at a time."""
        return False

    def activation_layers(self, strategy: StrategyConfig, dims: ParallelDims, n_layer: int) -> float:
        """How many layers' activations of one micro-batch a rank holds at once at its peak."""
        return float(n_layer)

    def waits_in_compute(self, strategy: StrategyConfig, dims: ParallelDims) -> bool:
        """Whether a rank waits for its peers inside forward and backward, where the step timer cannot tell the
        wait from compute (gpt.train.compute_probe judges it then). Replicas that reduce gradients wait after the
        backward's compute, which the step timer measures."""
        return False

    def collectives(self, strategy: StrategyConfig, dims: ParallelDims, w: Workload) -> list[Collective]:
        return []

    @property
    def keys_read(self) -> tuple[str, ...]:
        return ("name", *self.keys)

    def check_checkpoint_keys(self, path: Any, saved: dict[str, Any], strategy: StrategyConfig) -> None:
        """Refuse, in one line, a checkpoint of this strategy whose checkpoint_keys (`saved`, those recorded)
        these settings cannot load."""

    def check(self, strategy: StrategyConfig) -> None:
        """The strategy section: a non-default value of a key only other strategies read is refused, naming them;
        then the values."""
        only_own_keys(strategy, "strategy", {name: t.keys for name, t in REGISTRY.items()})
        strategy.check_values()


@register
class SingleTraits(StrategyTraits):
    """One process: no wrapping. Any world size > 1 needs a distributed strategy."""

    name = "single"
    implementation = "gpt.parallel.base:Strategy"
    axes = ()
    no_reduce_dtype = "one process reduces no gradients"

    def data_parallel_size(self, strategy, parallel, model, world_size, train=None):
        if world_size != 1:
            raise ConfigError("strategy", self.name, f"a distributed strategy (ddp, ...) for {world_size} ranks; "
                              "strategy=single runs exactly one process")
        return 1


@register
class DDPTraits(StrategyTraits):
    """DistributedDataParallel: every rank holds the whole model; gradients are all-reduced in buckets, and held
    once: each .grad is a view into its bucket (gpt.parallel.ddp.replicate; ZeRO-1's DDP and DDP inside pipeline
    stages too). Without that view they were held twice, 3.87 GiB more for llama_1b, as the dry run showed."""

    name = "ddp"
    implementation = "gpt.parallel.ddp:DDP"
    keys = ("bucket_cap_mb",)

    def reduces_with_ddp(self, strategy):
        return True

    def data_parallel_size(self, strategy, parallel, model, world_size, train=None):
        """A model compiled whole is split at DDP's buckets by torch's DDP optimizer (torch._dynamo's optimize_ddp),
        which fails at the first step on buckets smaller than DDP's first one (1 MiB: "First bucket should be
        smaller/equal to other buckets")."""
        if (train is not None and train.compile and self.compile_scope(train) == "model"
                and strategy.bucket_cap_mb < FIRST_BUCKET_MB):
            raise ConfigError("strategy.bucket_cap_mb", strategy.bucket_cap_mb, f"{FIRST_BUCKET_MB} or more with "
                              f"train.compile and train.compile_scope={train.compile_scope} (torch's DDP optimizer "
                              "splits the compiled model at DDP's buckets, none smaller than its first, of 1 MiB), "
                              "or train.compile_scope=blocks")
        return world_size

    def collectives(self, strategy, dims, w):
        if dims.dp == 1:
            return []
        grads = w.grad_bytes * w.params  # buckets of fp32 gradients, reduced in train.reduce_dtype
        bucket = strategy.bucket_cap_mb * 2**20 * w.grad_bytes / 4
        return [Collective("all_reduce", grads, _buckets(grads, bucket), "dp",
                           f"{w.reduce_dtype} gradients, in buckets")]


@register
class Zero1Traits(DDPTraits):
    """ZeRO stage 1 in plain PyTorch: DDP's gradients, torch's ZeroRedundancyOptimizer splits the AdamW state."""

    name = "zero1"
    implementation = "gpt.parallel.zero1:Zero1"
    data_axis = "dp_shard"

    def state_shares(self, strategy, dims):
        return 1.0, 1.0, 1.0 / dims.dp  # the AdamW state split over the replicas

    def optimizer_share(self, strategy, dims, model):
        """torch's ZeroRedundancyOptimizer splits whole parameters, not their elements: each parameter group's
        (gpt.train.optim: the matrices, then the vectors), largest first, to the rank that holds the fewest so far.
        The rank given the largest keeps all its state however many ranks there are: llama_1b's 32k x 2048
        embedding, 1/16 of its parameters, is rank 0's alone at 64 ranks and at 1,024, where an even split is 1/64
        and 1/1,024 (the dry run, launch.dry_run, found it: 500 MiB held where 124 and 8 MiB were estimated)."""
        return _most_partitioned(model, dims.dp) / sum(math.prod(s) for _, s in parameter_shapes(model))

    def collectives(self, strategy, dims, w):
        if dims.dp == 1:
            return []
        return [*super().collectives(strategy, dims, w),
                Collective("all_gather", 4.0 * w.params, 1, "dp", "updated parameter partitions")]


@register
class DeepSpeedTraits(StrategyTraits):
    """The DeepSpeed engine with ZeRO stage 0-3 (needs `pip install deepspeed`)."""

    name = "deepspeed"
    implementation = "gpt.parallel.deepspeed:DeepSpeed"
    keys = ("stage", "offload_optimizer", "overlap_comm", "reduce_bucket_size", "config")
    whole_model_compile = False
    data_axis = "dp_shard"
    checkpoint_format = "deepspeed"  # the engine's own files, tied to the world size that wrote them
    reshardable = False
    checkpoint_keys = ("stage",)  # ZeRO-1 and 2 share one optimizer and its files; ZeRO-0 and ZeRO-3 have their own
    no_dry_run = ("DeepSpeed's ZeRO optimizers copy every parameter's values as they are built (a meta tensor has "
                  "none), so each rank would be built at real size (llama_1b's ZeRO-1: 9.5 GB of host memory per "
                  "rank), and their state comes only from a step on the gradients a backward through the engine "
                  "reduced into its partitions")
    no_fp8 = "the engine casts the model itself and is not compiled; torchao's float8 is built for FSDP2 and DDP"

    def check_compute(self, train, strategy, parallel):
        super().check_compute(train, strategy, parallel)
        if train.fused_qkv and strategy.stage == 3:
            raise ConfigError("train.fused_qkv", True, "false with strategy=deepspeed strategy.stage=3 (ZeRO-3 "
                              "gathers each layer's weights as that layer runs, and q, k and v would run as one)")

    def check_checkpoint_keys(self, path, saved, strategy):
        stage, asked = saved.get("stage"), strategy.stage
        loads = {1, 2} if stage in (1, 2) else {stage}
        if stage is not None and asked not in loads:
            raise UserError(f"checkpoint {path} was written with strategy.stage={stage} and this run asks for "
                            f"strategy.stage={asked}: DeepSpeed's ZeRO-{stage} checkpoint does not load into "
                            f"ZeRO-{asked}; continue with strategy.stage={' or '.join(map(str, sorted(loads)))} (or "
                            f"export its weights, python -m gpt.export RUN_DIR DIR, and start a new run from them "
                            f"with the init=hf:DIR command it prints)")

    def data_parallel_size(self, strategy, parallel, model, world_size, train=None):
        precision = train.precision if train is not None else "fp32"
        if precision == "bf16" and strategy.stage == 0:
            raise ConfigError("strategy.stage", 0, "1, 2 or 3 with train.precision=bf16 (at stage 0 DeepSpeed "
                              "accumulates gradients in bf16 and training drifts)")
        if train is not None and train.compile:
            raise ConfigError("train.compile", True, "false with strategy=deepspeed (the engine is not compiled)")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("strategy", "deepspeed", "DeepSpeed installed (it is not); `pip install deepspeed`, or "
                              "pick strategy=zero1 (ZeRO-1) or strategy=fsdp (ZeRO-3-like) from PyTorch")
        if precision == "fp16" and device_type(train) == "cpu":
            from deepspeed.accelerator import get_accelerator  # this machine's: a CPU run's ranks run here

            if not get_accelerator().is_fp16_supported():
                raise ConfigError("train.precision", "fp16", "fp32 or bf16 with strategy=deepspeed on this CPU "
                                  "(DeepSpeed's CPU accelerator has no fp16 here)")
        return world_size

    def param_fraction(self, strategy, dims):
        return 1.0 / dims.dp if strategy.stage == 3 else 1.0

    def state_bytes(self, strategy, precision):
        # the engine casts the model to bf16/fp16; ZeRO's optimizer steps an fp32 copy of its partition
        return 4 if precision == "fp32" else 2, 4, 12 if strategy.stage >= 1 else 8

    def state_shares(self, strategy, dims):
        split = 1.0 / dims.dp  # ZeRO: stage 1 splits the optimizer state, 2 the gradients too, 3 the parameters too
        stage = strategy.stage
        return split if stage >= 3 else 1.0, split if stage >= 2 else 1.0, split if stage >= 1 else 1.0

    def waits_in_compute(self, strategy, dims):
        return strategy.stage == 3 and dims.dp > 1  # parameters gathered layer by layer

    def collectives(self, strategy, dims, w):
        if dims.dp == 1:
            return []
        stage, grads, reduced = strategy.stage, 4.0 * w.params, w.grad_bytes * w.params
        calls = _buckets(grads, strategy.reduce_bucket_size * 4)
        if stage < 3:
            return [Collective("all_reduce", reduced, calls, "dp", f"ZeRO-{stage} gradient reduction")]
        return [Collective("all_gather", 2 * grads, calls * w.n_layer, "dp", "parameters, forward and backward"),
                Collective("reduce_scatter", reduced, calls * w.n_layer, "dp", "gradients")]


@register
class FSDPTraits(StrategyTraits):
    """FSDP2 (`fully_shard` on a DeviceMesh), with HSDP and tensor parallel on the layout's axes."""

    name = "fsdp"
    implementation = "gpt.parallel.fsdp:FSDP"
    keys = ("reshard_after_forward", "cpu_offload")
    whole_model_compile = False
    gathers_parameters = True
    no_cuda_graphs = ("FSDP frees each block's gathered parameters after use and gathers them again into new memory, "
                      "which a CUDA graph, recorded at fixed addresses, cannot replay")
    data_axis = "dp_shard"
    axes = ("dp_replicate", "dp_shard", "tp")

    def data_parallel_size(self, strategy, parallel, model, world_size, train=None):
        check_fsdp_options(strategy, train)
        return world_size

    def layout(self, strategy, parallel, world_size):
        dims = read_dims(parallel, world_size)
        refuse_axes(dims, self.name, self.axes)
        return dims

    def param_fraction(self, strategy, dims):
        return 1.0 / (dims.dp_shard * dims.tp)

    def padding(self, strategy, dims, model):
        """FSDP2 splits each tensor's first dimension in chunks of ceil(rows / dp_shard), so rank 0 holds a whole chunk
        of every tensor: more than an even share where the rows do not divide (the dry run found llama_1b's rank 0 3.3%
        above it at 1,024 ranks, 9% near 2,048 and 38% at 4,096). Each tp rank's part splits alike; left even under
        tensor parallelism, where that part's rows depend on the tensor's split."""
        if dims.dp_shard == 1 or dims.tp > 1:
            return 1.0
        shapes = [shape for _, shape in parameter_shapes(model)]
        chunks = sum(math.ceil(shape[0] / dims.dp_shard) * math.prod(shape[1:]) for shape in shapes)
        return chunks * dims.dp_shard / sum(math.prod(shape) for shape in shapes)

    def accumulating_grad_share(self, strategy, dims, micro_steps):
        """Before the last micro-step gpt.parallel.fsdp turns the gradients' reduction off
        (set_requires_gradient_sync(False)), and torch 2.13's FSDP2 then keeps every block's gradients unsharded
        until it (FSDPParamGroup.post_backward: unsharded_accumulated_grad, in the fp32 reduce dtype under bf16 and
        fp16; the fp32 parameter's own .grad under fp32): the rank's tensor-parallel part of the whole model's,
        whatever dp_shard."""
        return 1.0 / dims.tp if micro_steps else 0.0

    def waits_in_compute(self, strategy, dims):
        return dims.dp > 1 or dims.tp > 1  # per-layer all-gathers and reductions, tensor-parallel all-reduces

    def collectives(self, strategy, dims, w):
        local = w.params / dims.tp  # each tp rank shards its own part over dp_shard
        out = []
        if dims.dp_shard > 1:
            gathers = 2 if strategy.reshard_after_forward else 1
            units = w.n_layer + 1
            gathered = w.value_bytes * local - (w.value_bytes - 1) * w.float8_gathered / dims.tp
            out += [Collective("all_gather", gathers * gathered, gathers * units, "dp_shard",
                               "parameters of each layer" + (", float8 where converted" if w.float8_gathered else "")),
                    Collective("reduce_scatter", w.grad_bytes * local, units, "dp_shard",
                               f"{w.reduce_dtype} gradients of each layer")]
        if dims.dp_replicate > 1:
            out.append(Collective("all_reduce", w.grad_bytes * local / dims.dp_shard, w.n_layer + 1, "dp_replicate",
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


@register
class PipelineTraits(StrategyTraits):
    """torch.distributed.pipelining stages (parallel.pp) with DDP or FSDP inside each stage."""

    name = "pipeline"
    implementation = "gpt.parallel.pipeline:Pipeline"
    keys = ("schedule", "microbatches", "stages_per_rank", "dp", "bucket_cap_mb", "reshard_after_forward",
            "cpu_offload")
    preset = {"parallel": {"pp": 2}}
    whole_model_compile = False
    no_fp8 = "its stages are not compiled (train.compile=false), and float8 is slower than bf16 uncompiled"
    no_bf16_residual = "each stage sends its hidden states in bf16 already, and the next continues them in fp32"
    axes = ("pp", "dp_replicate", "dp_shard", "tp")

    def data_parallel_size(self, strategy, parallel, model, world_size, train=None):
        pp, schedule = parallel.pp, strategy.schedule
        micro = strategy.pipeline_microbatches(pp)
        if pp < 2 or world_size % pp:
            valid = ", ".join(str(d) for d in range(2, world_size + 1) if world_size % d == 0)
            raise ConfigError("parallel.pp", pp, f"a divisor >= 2 of the world size {world_size} (nodes x tasks per "
                              f"node) with strategy=pipeline: {valid or 'none; run at least 2 ranks'}; or change the "
                              f"number of ranks to a multiple of {max(pp, 2)}")
        dp = world_size // pp
        per_rank = strategy.stages_per_rank if schedule == "interleaved" else 1
        if pp * per_rank > model.n_layer:
            raise ConfigError("parallel.pp", pp, f"at most model.n_layer={model.n_layer} stages in all; "
                              f"pp={pp} x stages_per_rank={per_rank} gives {pp * per_rank}")
        self.check_microbatches(micro, pp, schedule)
        check_fsdp_options(strategy, train)
        if model.n_expert:
            raise ConfigError("model.n_expert", model.n_expert, "0 with strategy=pipeline (the MoE "
                              "load-balancing loss of earlier stages does not reach the last stage)")
        if train is not None:
            self.check_train(train, dp, pp, micro)
        return dp

    @staticmethod
    def check_microbatches(micro: int, pp: int, schedule: str) -> None:
        if micro < pp:
            raise ConfigError("strategy.microbatches", micro, f"an integer >= parallel.pp={pp}: with fewer "
                              "micro-batches than stages some stages never work at the same time as others")
        if schedule == "interleaved" and micro % max(1, micro // pp):
            raise ConfigError("strategy.microbatches", micro, f"a multiple of {max(1, micro // pp)} for the "
                              f"interleaved schedule (e.g. {pp} or {2 * pp})")

    @staticmethod
    def check_train(train: TrainConfig, dp: int, pp: int, micro: int) -> None:
        if train.precision == "fp16":
            raise ConfigError("train.precision", "fp16", "fp32 or bf16 with strategy=pipeline (no loss scaler across "
                              "stages)")
        if train.compile:
            raise ConfigError("train.compile", True, "false with strategy=pipeline")
        if train.global_batch_size % dp == 0 and (train.global_batch_size // dp) % micro:
            raise ConfigError("strategy.microbatches", micro, f"a divisor of the per-replica batch "
                              f"{train.global_batch_size // dp} (train.global_batch_size={train.global_batch_size} / "
                              f"data-parallel size {dp}), at least pp={pp}")

    def reduces_with_ddp(self, strategy):
        return strategy.dp == "ddp"

    def layout(self, strategy, parallel, world_size):
        dims = read_dims(parallel, world_size)
        refuse_axes(dims, self.name, self.axes)
        if dims.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel", True, "false with strategy=pipeline (a later stage "
                              "would take its RoPE positions from its slice of the sequence)")
        inside = "dp_shard" if strategy.dp == "fsdp" else "dp_replicate"
        if dims.tp > 1 and dims.dp > 1 and inside == "dp_replicate":
            raise ConfigError("strategy.dp", strategy.dp, "fsdp with parallel.tp > 1 (DDP does not take "
                              "the tensor-parallel DTensor parameters; FSDP2 does)")
        return ParallelDims(pp=dims.pp, tp=dims.tp, **{inside: dims.dp})

    def param_fraction(self, strategy, dims):
        return 1.0 / (dims.pp * dims.dp_shard * dims.tp)

    def accumulating_grad_share(self, strategy, dims, micro_steps):
        """A step is micro-batches (strategy.microbatches), and torch 2.13's schedules run each backward with FSDP's
        reduction off and its parameters left gathered (PipelineStage.backward_maybe_with_nosync), reducing only
        at the step's end (perform_reduce_grad): under dp=fsdp a rank holds its stage's gradients unsharded (fp32,
        the reduce dtype) through the backward; under dp=ddp in place, the step's own."""
        if self.gathers_whole(strategy, dims):
            return 1.0 / (dims.pp * dims.tp)
        return super().accumulating_grad_share(strategy, dims, micro_steps)

    def gathers_whole(self, strategy, dims):
        """dp=fsdp: a stage's parameters stay gathered from its first backward to the step's end (above)."""
        return strategy.dp == "fsdp" and dims.dp_shard > 1

    def activation_layers(self, strategy, dims, n_layer):
        """A stage's layers, for the micro-batches in flight at once (all of them under gpipe; under 1f1b and the
        interleaved schedule about pp), each a 1/microbatches part of the rank's batch."""
        micro = strategy.pipeline_microbatches(dims.pp)
        in_flight = micro if strategy.schedule == "gpipe" else min(micro, dims.pp)
        return n_layer / dims.pp * in_flight / micro

    def waits_in_compute(self, strategy, dims):
        return True  # a stage receives its inputs and its gradients from its neighbours

    def collectives(self, strategy, dims, w):
        stage = w.grad_bytes * w.params / dims.pp / dims.tp
        out = []
        if dims.dp > 1:
            bucket = strategy.bucket_cap_mb * 2**20
            out.append(Collective("all_reduce", stage, _buckets(stage, bucket), "dp", "each stage's gradients"))
        if dims.tp > 1:
            calls = 4 * w.n_layer // dims.pp + 1  # this stage's layers, forward and backward; embedding or head
            out.append(Collective("all_reduce", calls * w.activation_bytes(dims), calls, "tp",
                                  "partial activations"))
        if dims.pp > 1:
            micro = strategy.pipeline_microbatches(dims.pp)
            out.append(Collective("p2p", 2 * w.activation_bytes(dims), 2 * micro, "pp",
                                  "activations forward, their gradients backward"))
        return out


def saved_format(meta: dict[str, Any]) -> str:
    """The checkpoint format a checkpoint's metadata names (older checkpoints: that of the strategy that wrote it)."""
    return meta.get("checkpoint_format") or traits_of(meta.get("strategy") or "single").checkpoint_format


def strategy_keys(strategy: StrategyConfig) -> dict[str, Any]:
    """The strategy's checkpoint_keys and their values, as meta.json records them."""
    return {key: getattr(strategy, key) for key in traits_of(strategy.name).checkpoint_keys}


def written_with(meta: dict[str, Any]) -> str:
    """The settings a checkpoint was written with, as overrides (those it records): strategy=deepspeed
    strategy.stage=2."""
    keys = meta.get("strategy_keys") or {}
    return " ".join([f"strategy={meta.get('strategy') or 'single'}", *(f"strategy.{k}={v}" for k, v in keys.items())])


def check_loadable(path: Any, meta: dict[str, Any], strategy: StrategyConfig, world_size: int) -> None:
    """Refuse, in one line, a checkpoint (`meta`: its meta.json) that `strategy` on `world_size` ranks cannot load:
    another format, a format tied to the world size that wrote it, or to strategy keys it was written with
    (checked at planning, and by the ranks; a checkpoint that does not record them is left to the ranks)."""
    written_by, world, saved = meta.get("strategy"), meta.get("world_size"), saved_format(meta)
    traits = traits_of(strategy.name)
    if saved != traits.checkpoint_format:
        raise UserError(f"checkpoint {path} was written by strategy={written_by} in the {saved} format, which "
                        f"does not load into strategy={strategy.name} ({traits.checkpoint_format}): resume "
                        f"with strategy={written_by}")
    if not traits.reshardable and world != world_size:
        raise UserError(f"checkpoint {path} was written by strategy={written_by} on {world} ranks and this run "
                        f"has {world_size}: its {saved} checkpoints cannot be resharded; resume on "
                        f"{world} ranks (or use a strategy whose DCP checkpoints reshard: ddp, fsdp, zero1, "
                        "pipeline)")
    if written_by == strategy.name:
        traits.check_checkpoint_keys(path, meta.get("strategy_keys") or {}, strategy)
