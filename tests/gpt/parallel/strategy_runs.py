"""Runs shared by the tests of tests/parallel: each strategy configuration trains once per session.

Every run trains the same 4-layer tiny GPT for 10 steps on the same global batch (8 sequences) and seed, with a
learning rate high enough (and gradient clipping active) that a wrong gradient shows in the loss within a step or
two. The baseline is one process, strategy=single.
"""
from __future__ import annotations

from pathlib import Path

from helpers import launch, read_metrics

STEPS = 10
COMMON = ["model=tiny", "model.n_layer=4", f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.lr=3e-3",
          "train.global_batch_size=8", "train.log_interval=1", "train.eval_interval=5", "train.eval_batches=2",
          "checkpoint.interval_steps=0"]
FP32_RTOL = 1e-5
# bf16 against the fp32 baseline: bf16 rounding alone moves the single-process losses by up to 0.7% over 20
# steps (FSDP's bf16 parameters, DeepSpeed's bf16 model and autocast each differently); a wrong gradient moves
# them by 5-15% (a stale clip setting: 9%; pipeline x DDP(static_graph): 14%).
BF16_RTOL = 2e-2

PIPELINE = ["strategy=pipeline", "strategy.microbatches=4"]
# The tensor-parallel cases' model: grouped-query attention (4 heads, 2 query groups), RoPE, SwiGLU, RMSNorm;
# its baseline is one process on the same model.
GQA = ["model.n_head=4", "model.n_query_groups=2", "model.position=rope", "model.mlp=swiglu", "model.norm=rmsnorm"]
TP = ["strategy=fsdp", "parallel.tp=2"]
# name -> (overrides, ranks)
CASES: dict[str, tuple[list[str], int]] = {
    "ddp": (["strategy=ddp", "nodes=2"], 2),  # 2 "nodes" x 1 task, as the acceptance line runs it
    "fsdp": (["strategy=fsdp", "cluster.tasks_per_node=2"], 2),
    "fsdp_checkpointing_accumulation": (["strategy=fsdp", "train.activation_checkpointing=full",
                                         "train.micro_batch_size=2", "cluster.tasks_per_node=2"], 2),
    "zero1": (["strategy=zero1", "nodes=2"], 2),
    "deepspeed_zero1": (["strategy=deepspeed", "strategy.stage=1", "nodes=2"], 2),
    "deepspeed_zero2_accumulation": (["strategy=deepspeed", "strategy.stage=2", "train.micro_batch_size=2",
                                      "cluster.tasks_per_node=2"], 2),
    "deepspeed_zero3": (["strategy=deepspeed", "strategy.stage=3", "cluster.tasks_per_node=2"], 2),
    "pipeline_gpipe": ([*PIPELINE, "strategy.schedule=gpipe", "cluster.tasks_per_node=2"], 2),
    "pipeline_interleaved": ([*PIPELINE, "strategy.schedule=interleaved", "cluster.tasks_per_node=2"], 2),
    "pp2_dp2_1f1b_ddp": ([*PIPELINE, "strategy.schedule=1f1b", "strategy.dp=ddp", "nodes=2",
                          "cluster.tasks_per_node=2"], 4),
    # the default micro-batches (pp): the first stage runs no forward between its first and last backward, where
    # DDP's reducer, armed by the schedule's first-step shape inference, once recorded every parameter twice
    "pp2_dp2_1f1b_ddp_default_microbatches": (["strategy=pipeline", "strategy.dp=ddp", "nodes=2",
                                               "cluster.tasks_per_node=2"], 4),
    # interleaved: two DDP stages on each rank, each reducing its own gradients after its last backward
    "pp2_dp2_interleaved_ddp": ([*PIPELINE, "strategy.schedule=interleaved", "strategy.dp=ddp", "nodes=2",
                                 "cluster.tasks_per_node=2"], 4),
    "pp2_dp2_gpipe_fsdp_accumulation": ([*PIPELINE, "strategy.schedule=gpipe", "strategy.dp=fsdp",
                                         "train.micro_batch_size=2", "cluster.tasks_per_node=4"], 4),
    "tp2_gqa": ([*TP, *GQA, "cluster.tasks_per_node=2"], 2),
    "tp2_sequence_parallel_gqa": ([*TP, "parallel.sequence_parallel=true", *GQA, "cluster.tasks_per_node=2"], 2),
    # learned positions and a GELU MLP, sequence parallel inside each of 2 FSDP shards
    "fsdp2_tp2_sequence_parallel": ([*TP, "parallel.sequence_parallel=true", "cluster.tasks_per_node=4"], 4),
    "hsdp2x2": (["strategy=fsdp", "parallel.dp_replicate=2", "nodes=2", "cluster.tasks_per_node=2"], 4),
    # tp inside each pipeline stage; activation checkpointing (a train option, any layout) on every layer
    "pp2_tp2_recompute": ([*PIPELINE, "parallel.tp=2", *GQA, "train.activation_checkpointing=full",
                           "cluster.tasks_per_node=4"], 4),
    # 2 nodes of 4: tp inside a node, FSDP over the replicas of a stage, stages across nodes
    "pp2_dp2_tp2": ([*PIPELINE, "strategy.schedule=gpipe", "strategy.dp=fsdp", "parallel.tp=2", *GQA,
                     "train.activation_checkpointing=every_2", "nodes=2", "cluster.tasks_per_node=4"], 8),
}
BF16_CASES: dict[str, tuple[list[str], int]] = {
    "fsdp_bf16": (["strategy=fsdp", "train.precision=bf16", "cluster.tasks_per_node=2"], 2),
    "deepspeed_zero2_bf16": (["strategy=deepspeed", "strategy.stage=2", "train.precision=bf16",
                              "cluster.tasks_per_node=2"], 2),
    # autocast: the stages send their hidden states in bf16, a rounding of the fp32 residual stream per hop
    "pipeline_1f1b_bf16": ([*PIPELINE, "strategy.schedule=1f1b", "train.precision=bf16", "cluster.tasks_per_node=2"], 2),
}
SINGLE: tuple[list[str], int] = (["strategy=single"], 1)
BASELINES = {"single": SINGLE, "single_gqa": (["strategy=single", *GQA], 1)}


def baseline_of(name: str) -> str:
    """The one-process run that configuration `name` must match (the same model)."""
    return "single_gqa" if name in CASES and set(GQA) <= set(CASES[name][0]) else "single"

_done: dict[str, Path] = {}


def run(name: str, tmp_path_factory, data_overrides: list[str]) -> Path:
    """The run folder of configuration `name` (or a baseline), trained on first use."""
    if name not in _done:
        overrides, _ = {**BASELINES, **CASES, **BF16_CASES}[name]
        run_dir = tmp_path_factory.mktemp("parallel") / name
        proc = launch(*COMMON, *data_overrides, *overrides, run_dir=run_dir)
        (run_dir / "launcher.log").write_text(proc.stdout + proc.stderr)
        _done[name] = run_dir
    return _done[name]


def ranks(name: str) -> int:
    return {**BASELINES, **CASES, **BF16_CASES}[name][1]


def val_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, kind="val")]


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def last_record(run_dir: Path, rank: int) -> dict:
    return read_metrics(run_dir, rank)[-1]

