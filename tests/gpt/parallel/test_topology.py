"""Topologies that cannot run are refused before any rank starts, with one line naming the key, the value and
what would be valid (exit code 2, no traceback)."""
from __future__ import annotations

import re

import pytest
import yaml
from hydra.errors import ConfigCompositionException

from helpers import compose, launch, spread
from gpt.config.model import ModelConfig
from launch import launch_config
from gpt.config.parse import to_plain
from gpt.config.strategy import ParallelConfig, StrategyConfig
from gpt.errors import ConfigError
from gpt.parallel import plan_layout, traits
from gpt.parallel.deepspeed import ds_config
from gpt.parallel.layout import ParallelDims
from gpt.parallel.layout import split_layers
from gpt.parallel.traits import traits_of
from gpt.config.train import TrainConfig
from launch.hydra_errors import user_error

FOUR = ["cluster.tasks_per_node=4"]
CASES = {
    "world size not divisible by pp": (["strategy=pipeline", "parallel.pp=3", *FOUR],
                                       "parallel.pp=3 is not valid: a divisor >= 2 of the world size 4"),
    "more stages than layers": (["strategy=pipeline", "parallel.pp=4", *FOUR],
                                "parallel.pp=4 is not valid: at most model.n_layer=2 stages"),
    "pipeline of one stage": (["strategy=pipeline", "parallel.pp=1", *FOUR],
                              "parallel.pp=1 is not valid: a divisor >= 2 of the world size 4"),
    "stages under another strategy": (["strategy=ddp", "parallel.pp=2", *FOUR],
                                      "parallel.pp=2 is not valid: 1 with strategy=ddp"),
    "more interleaved stages than layers": (["strategy=pipeline", "strategy.schedule=interleaved",
                                             "cluster.tasks_per_node=2"], "pp=2 x stages_per_rank=2 gives 4"),
    "fewer microbatches than stages": (["strategy=pipeline", "strategy.microbatches=1", "cluster.tasks_per_node=2"],
                                       "strategy.microbatches=1 is not valid: an integer >= parallel.pp=2"),
    "microbatches not dividing the replica batch": (
        ["strategy=pipeline", "strategy.microbatches=3", "train.global_batch_size=8", *FOUR],
        "strategy.microbatches=3 is not valid: a divisor of the per-replica batch 4"),
    "unknown schedule": (["strategy=pipeline", "strategy.schedule=zigzag", "cluster.tasks_per_node=2"],
                         "one of gpipe, 1f1b, interleaved"),
    "pipeline on one rank": (["strategy=pipeline"], "parallel.pp=2 is not valid: a divisor >= 2 of the world size 1"),
    "cpu offload on a cpu": (["strategy=fsdp", "strategy.cpu_offload=true", "cluster.tasks_per_node=2"],
                             "strategy.cpu_offload=True is not valid: false on a CPU run"),
    "deepspeed bf16 at stage 0": (["strategy=deepspeed", "strategy.stage=0", "train.precision=bf16"],
                                  "strategy.stage=0 is not valid: 1, 2 or 3 with train.precision=bf16"),
    "unknown zero stage": (["strategy=deepspeed", "strategy.stage=4"], "strategy.stage=4 is not valid: 0, 1, 2 or 3"),
    "another strategy's key": (["strategy=fsdp", "strategy.stage=3"],
                               "strategy.stage=3 is not valid: strategy=fsdp reads cpu_offload, name"),
    "unknown strategy": (["strategy.name=tensor"], "strategy='tensor' is not valid: one of single, ddp, zero1"),
    # the layout (parallel.*)
    "layout product not the world size": (["strategy=fsdp", "parallel.dp_shard=3", *FOUR],
                                          "parallel.dp_shard=3 is not valid: sizes whose product is the world size 4"),
    "tp not dividing the heads": (["strategy=fsdp", "parallel.tp=4", *FOUR],
                                  "parallel.tp=4 is not valid: a divisor of model.n_head=2"),
    "tp across nodes": (["strategy=fsdp", "parallel.tp=2", "nodes=2"],
                        "parallel.tp=2 is not valid: a divisor of the 1 rank(s) per node"),
    "tp with moe": (["strategy=fsdp", "parallel.tp=2", "model.n_expert=2", "cluster.tasks_per_node=2"],
                    "parallel.tp=2 is not valid: 1 with model.n_expert=2"),
    "compile with moe": (["model.n_expert=2", "train.compile=true"],
                         "train.compile=True is not valid: false with model.n_expert=2"),
    "sequence parallel without tp": (["strategy=fsdp", "parallel.sequence_parallel=true", "cluster.tasks_per_node=2"],
                                     "parallel.sequence_parallel=True is not valid: false with parallel.tp=1"),
    "tp under ddp": (["strategy=ddp", "parallel.tp=2", "cluster.tasks_per_node=2"],
                     "parallel.tp=2 is not valid: 1 with strategy=ddp"),
    "two sizes left to the rest": (["strategy=fsdp", "parallel.tp=-1", *FOUR],
                                   "parallel.tp=-1 is not valid: a size: only one of the parallel sizes may be -1"),
    "unknown layout key": (["strategy=fsdp", "+parallel.cp=2"], "parallel.cp=2 is not valid: known parallel keys"),
    "pipeline x tp with ddp inside stages": (["strategy=pipeline", "parallel.tp=2", "cluster.tasks_per_node=8"],
                                             "strategy.dp='ddp' is not valid: fsdp with parallel.tp > 1"),
    "pipeline with sequence parallel": (["strategy=pipeline", "parallel.tp=2", "parallel.sequence_parallel=true",
                                         *FOUR], "parallel.sequence_parallel=True is not valid: false with "
                                         "strategy=pipeline"),
    "unknown activation checkpointing": (["train.activation_checkpointing=some"],
                                         "train.activation_checkpointing='some' is not valid: none, full, or every_K"),
}


# Through the launcher, as a user meets them; all cases are also checked in process below.
LAUNCHED = ["world size not divisible by pp", "cpu offload on a cpu",
            "deepspeed bf16 at stage 0", "layout product not the world size", "tp not dividing the heads",
            "tp across nodes", "tp with moe", "sequence parallel without tp"]


@pytest.mark.parametrize("name", LAUNCHED)
@pytest.mark.slow
def test_bad_topology_is_one_clear_line(name, tmp_path, data_overrides):
    overrides, message = CASES[name]
    proc = launch("model=tiny", *data_overrides, *overrides, run_dir=tmp_path / "run", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "logs").exists()  # no rank started


MOVED = {"strategy.pp=4": "strategy.pp=4 is not valid: use parallel.pp (the layout's pipeline stages) instead",
         "strategy.activation_checkpointing=true": "strategy.activation_checkpointing=True is not valid: use "
                                                   "train.activation_checkpointing=full (any strategy) instead"}


@pytest.mark.parametrize("override", MOVED)
def test_a_moved_key_names_the_key_to_use(override):
    """One key per knob: an old command gets one line naming the key that took over, from the command line (Hydra's
    schema refuses it) and from a config.yaml alike."""
    key, value = override.split("=")
    with pytest.raises(ConfigCompositionException) as composing:
        compose("model=tiny", "strategy=pipeline", override)
    assert str(user_error(composing.value, [override])) == MOVED[override]
    written = {**to_plain(launch_config.parse(compose("model=tiny", "strategy=pipeline"))), "strategy": {
        "name": "pipeline", key.split(".")[1]: yaml.safe_load(value)}}
    with pytest.raises(ConfigError, match=re.escape(MOVED[override])):
        launch_config.parse(written)


def test_a_run_folder_saved_before_the_keys_moved_still_reads(tmp_path):
    """A run's own config.yaml, written before one key per knob, holds strategy.pp and
    strategy.activation_checkpointing: it still loads (resume, report, status), with their values in their new keys."""
    from gpt.config import schema

    old = to_plain(launch_config.parse(compose("model=tiny", "strategy=pipeline", "parallel.pp=1")))
    old["strategy"] = {"name": "pipeline", "pp": 4, "activation_checkpointing": True, "schedule": "1f1b"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    run = schema.load(tmp_path / "config.yaml")
    assert (run.parallel.pp, run.train.activation_checkpointing) == (4, "full")


def plan(overrides: list[str]) -> int:
    """What launch.planning.plan checks, on the config Hydra composes for `model=tiny` and these overrides: the
    data-parallel size (a ConfigError for a layout that cannot run)."""
    return layout(overrides).dp


def layout(overrides: list[str]) -> ParallelDims:
    run = launch_config.parse(compose("model=tiny", *overrides))
    per_node = run.cluster.tasks_per_node
    dims = plan_layout(run.strategy, run.parallel, run.model, run.nodes * per_node, per_node, run.train)
    run.train.micro_batches(dims.dp)
    return dims


@pytest.mark.parametrize("overrides,message", CASES.values(), ids=CASES.keys())
@pytest.mark.slow
def test_bad_topology_is_refused_with_its_message(overrides, message):
    with pytest.raises(ConfigError) as error:
        plan(overrides)
    assert message in str(error.value)


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.slow
def test_deepspeed_fp16_on_a_cpu_runs_where_the_cpu_has_it(monkeypatch, fp16):
    """DeepSpeed's CPU accelerator says whether this CPU computes fp16: both answers, whatever this machine's CPU."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: fp16)
    overrides = ["strategy=deepspeed", "train.precision=fp16", "cluster.tasks_per_node=2"]
    if fp16:
        plan(overrides)
    else:
        with pytest.raises(ConfigError, match="train.precision='fp16' is not valid: fp32 or bf16 with "
                                              "strategy=deepspeed on this CPU"):
            plan(overrides)


def test_missing_deepspeed_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(traits.importlib.util, "find_spec", lambda name: None)  # as where it is not installed
    with pytest.raises(ConfigError, match="strategy='deepspeed' is not valid: DeepSpeed installed .* `pip install "
                                          "deepspeed`"):
        plan(["strategy=deepspeed", "cluster.tasks_per_node=2"])


# --- the same checks, in process ------------------------------------------------------------------------------
def tiny(n_layer: int = 4) -> ModelConfig:
    return ModelConfig(name="t", n_layer=n_layer, n_head=2, n_embd=64, block_size=64, vocab_size=65)


@pytest.mark.parametrize("pp,world,dp", [(2, 2, 1), (2, 4, 2), (4, 8, 2)])
def test_pipeline_data_parallel_degree_is_world_over_pp(pp, world, dp):
    cfg, parallel = StrategyConfig("pipeline", microbatches=pp), ParallelConfig(pp=pp)
    assert traits_of("pipeline").data_parallel_size(cfg, parallel, tiny(), world, TrainConfig(global_batch_size=8)) == dp


@pytest.mark.parametrize("overrides,dp", spread("overrides,dp", [(["strategy=ddp", "cluster.tasks_per_node=4"], 4),
                                          (["strategy=fsdp", "cluster.tasks_per_node=2"], 2),
                                          (["strategy=zero1", "cluster.tasks_per_node=2"], 2),
                                          (["strategy=deepspeed", "strategy.stage=3", "train.precision=bf16"], 1),
                                          (["strategy=pipeline", "strategy.dp=fsdp", "strategy.schedule=gpipe",
                                            "cluster.tasks_per_node=4"], 2),
                                          (["strategy=fsdp"], 1)], 3))
def test_good_topologies_pass(overrides, dp):
    assert plan(overrides) == dp


@pytest.mark.parametrize("overrides,dims", spread("overrides,dims", [
    (["strategy=ddp", *FOUR], ParallelDims(dp_replicate=4)),
    (["strategy=zero1", *FOUR], ParallelDims(dp_shard=4)),
    (["strategy=fsdp", *FOUR], ParallelDims(dp_shard=4)),
    (["strategy=fsdp", "parallel.dp_replicate=2", *FOUR], ParallelDims(dp_replicate=2, dp_shard=2)),
    (["strategy=fsdp", "parallel.tp=2", "parallel.sequence_parallel=true", *FOUR],
     ParallelDims(dp_shard=2, tp=2, sequence_parallel=True)),
    (["strategy=fsdp", "parallel.tp=2", "parallel.tp_across_nodes=true", "nodes=2"], ParallelDims(tp=2)),
    (["strategy=pipeline", "strategy.dp=fsdp", "strategy.schedule=gpipe", *FOUR], ParallelDims(pp=2, dp_shard=2)),
    (["strategy=pipeline", *FOUR], ParallelDims(pp=2, dp_replicate=2)),
    (["strategy=pipeline", "strategy.dp=fsdp", "parallel.tp=2", "cluster.tasks_per_node=8"],
     ParallelDims(pp=2, dp_shard=2, tp=2)),
], 3))
def test_presets_are_layouts(overrides, dims):
    assert layout(overrides) == dims


def test_the_banner_names_the_layout_and_its_nodes():
    dims = ParallelDims(dp_shard=2, tp=2, sequence_parallel=True)
    assert dims.describe(2) == "dp_shard=2 x tp=2, sequence parallel (node 0: ranks 0-1, node 1: ranks 2-3)"
    assert ParallelDims().describe(1) == "one rank (node 0: rank 0)"


def test_layers_split_into_contiguous_runs_earlier_stages_take_the_extra():
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(12, 8)[:4] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert sum(len(r) for r in split_layers(12, 8)) == 12


def test_deepspeed_config_follows_ours():
    cfg = StrategyConfig("deepspeed", stage=3, offload_optimizer=True,
                         config={"zero_optimization": {"round_robin_gradients": True}, "steps_per_print": 10})
    ds = ds_config(cfg, "bf16", grad_clip=1.0, micro_batch=2, grad_accum=3, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["round_robin_gradients"] is True  # merged, not replaced
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["steps_per_print"] == 10 and ds["gradient_clipping"] == 1.0


def test_config_error_names_key_value_and_valid():
    cfg = StrategyConfig("pipeline", microbatches=2)
    with pytest.raises(ConfigError, match="model.n_expert=4 is not valid: 0 with strategy=pipeline"):
        traits_of("pipeline").data_parallel_size(cfg, ParallelConfig(pp=2), ModelConfig(**{**tiny().__dict__,
                                                                                            "n_expert": 4}), 2)
