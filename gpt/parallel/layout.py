"""The parallel layout: how many ranks replicate, shard, split tensors and pipeline the model (as torchtitan's
ParallelDims). One description, checked once before launch, from the `parallel` config section and the strategy
preset (strategy=ddp is "every rank a replica", strategy=fsdp "every rank a shard", ...).

The mesh is (pp, dp_replicate, dp_shard, tp), outermost first: rank r sits at the row-major coordinates of r, so
tp groups are neighbouring ranks and stay on one node whenever the tasks per node are a multiple of tp.
"""
from __future__ import annotations

from dataclasses import dataclass

from gpt.config.model import ModelConfig
from gpt.config.strategy import AXES, ParallelConfig
from gpt.errors import ConfigError

WHY_TP_IN_NODE = ("tensor parallel all-reduces activations twice per layer, which across nodes runs at network "
                  "instead of NVLink speed; set parallel.tp_across_nodes=true to force it")


@dataclass(frozen=True)
class ParallelDims:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    sequence_parallel: bool = False

    @property
    def dp(self) -> int:
        """Replicas that read different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    def axes(self) -> str:
        """'dp_shard=2 x tp=2, sequence parallel'; axes of size 1 left out."""
        axes = " x ".join(f"{a}={n}" for a, n in self.sizes().items() if n > 1) or "one rank"
        return axes + (", sequence parallel" if self.sequence_parallel else "")

    def describe(self, ranks_per_node: int) -> str:
        """'dp_shard=2 x tp=2 (node 0: ranks 0-1, node 1: ranks 2-3)' for the banner; axes of size 1 left out."""
        axes = self.axes()
        nodes = [(start, min(start + ranks_per_node, self.world_size) - 1)
                 for start in range(0, self.world_size, max(ranks_per_node, 1))]
        where = ", ".join(f"node {i}: ranks {a}-{b}" if b > a else f"node {i}: rank {a}"
                          for i, (a, b) in enumerate(nodes))
        return f"{axes} ({where})"


def read_dims(parallel: ParallelConfig, world_size: int, **fixed: int) -> ParallelDims:
    """The layout `parallel` asks for on `world_size` ranks, with at most one size -1 ("the rest"); `fixed` sizes
    come from the strategy preset and replace the section's."""
    sizes = {**parallel.sizes(), **fixed}
    rest = [axis for axis, n in sizes.items() if n == -1]
    known = 1
    for n in sizes.values():
        known *= n if n != -1 else 1
    if rest:
        sizes[rest[0]] = max(world_size // known, 1)
    dims = ParallelDims(**sizes, sequence_parallel=parallel.sequence_parallel)
    if dims.world_size != world_size:
        product = " x ".join(f"{a}={n}" for a, n in dims.sizes().items())
        key = next((a for a in reversed(AXES) if a not in rest and sizes[a] > 1), rest[0] if rest else "dp_shard")
        raise ConfigError(f"parallel.{key}", sizes[key], f"sizes whose product is the world size {world_size} "
                          f"(nodes x tasks per node); {product} = {dims.world_size}")
    return dims


def check_dims(dims: ParallelDims, parallel: ParallelConfig, model_cfg: ModelConfig, ranks_per_node: int) -> None:
    """What a model and the nodes need of a layout: whole heads per tp rank, tp inside a node, no MoE under tp."""
    if dims.sequence_parallel and dims.tp == 1:
        raise ConfigError("parallel.sequence_parallel", True, "false with parallel.tp=1 (it splits norms and "
                          "residuals along the sequence over the tensor-parallel ranks)")
    if dims.tp == 1:
        return
    widths = {"model.n_head": model_cfg.n_head, "model.n_query_groups": model_cfg.n_kv_head,
              "the MLP width": model_cfg.mlp_hidden}
    bad = [f"{name}={n}" for name, n in widths.items() if n % dims.tp]
    if bad:
        valid = [d for d in range(1, min(widths.values()) + 1) if all(n % d == 0 for n in widths.values())]
        raise ConfigError("parallel.tp", dims.tp, f"a divisor of {', '.join(bad)} (each rank computes whole heads, "
                          f"query groups and MLP columns): {', '.join(map(str, valid))}")
    if model_cfg.n_expert:
        raise ConfigError("parallel.tp", dims.tp, f"1 with model.n_expert={model_cfg.n_expert}: mixture-of-experts "
                          "layers have no tensor-parallel plan (use dp_shard or pp to split the model)")
    if ranks_per_node % dims.tp and not parallel.tp_across_nodes:
        raise ConfigError("parallel.tp", dims.tp, f"a divisor of the {ranks_per_node} rank(s) per node "
                          f"(cluster.tasks_per_node): {WHY_TP_IN_NODE}")


def refuse_axes(dims: ParallelDims, strategy: str, allowed: tuple[str, ...]) -> None:
    """A preset runs only some axes: the others must be 1."""
    for axis, n in dims.sizes().items():
        if n > 1 and axis not in allowed:
            raise ConfigError(f"parallel.{axis}", n, f"1 with strategy={strategy}, which runs "
                              f"{' and '.join(allowed) or 'one process'}: tensor parallel and HSDP (dp_replicate x "
                              "dp_shard) run under strategy=fsdp, pipelines under strategy=pipeline")


def split_layers(n_layer: int, n_stages: int) -> list[range]:
    """Contiguous runs of layer indices, one per stage; the first n_layer % n_stages stages take one more."""
    base, extra = divmod(n_layer, n_stages)
    runs, start = [], 0
    for s in range(n_stages):
        size = base + (s < extra)
        runs.append(range(start, start + size))
        start += size
    return runs
