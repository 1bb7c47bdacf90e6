"""What each rank holds: sharded strategies hold about 1/world of the parameters, pipeline ranks hold their own
layers only, and every rank's parameters receive gradients."""
from __future__ import annotations

import pytest

from gpt.config import schema
from gpt.parallel.traits import traits_of
from strategy_runs import baseline_of, last_record, ranks, run

pytestmark = pytest.mark.slow  # each case trains its strategy through `python -m launch`

EMBEDDING, HEAD = {"wte", "wpe"}, {"ln_f", "lm_head"}  # lm_head is the last stage's copy of the tied wte


@pytest.fixture(scope="module")
def total_bytes(tmp_path_factory, data_overrides) -> int:
    return last_record(run("single", tmp_path_factory, data_overrides), 0)["param_bytes"]


@pytest.mark.parametrize("name", ["fsdp", "deepspeed_zero3"])
def test_sharded_strategies_hold_a_share_of_the_parameters(name, total_bytes, tmp_path_factory, data_overrides):
    run_dir = run(name, tmp_path_factory, data_overrides)
    held = [last_record(run_dir, r)["param_bytes"] for r in range(ranks(name))]
    for share in held:
        assert 0.45 <= share / total_bytes <= 0.6, (held, total_bytes)
    assert 0.98 <= sum(held) / total_bytes <= 1.1  # shards add up to the model (with a little padding)


@pytest.mark.parametrize("name", ["ddp", "zero1", "deepspeed_zero1"])
def test_replicating_strategies_hold_every_parameter(name, total_bytes, tmp_path_factory, data_overrides):
    run_dir = run(name, tmp_path_factory, data_overrides)
    assert [last_record(run_dir, r)["param_bytes"] for r in range(ranks(name))] == [total_bytes] * ranks(name)


PIPELINE_LAYOUT = {
    # rank -> the parameter groups (wte, layers.N, ...) that rank holds (the banner names them too)
    "pp2_dp2_1f1b_ddp": {0: EMBEDDING | {"layers.0", "layers.1"}, 1: EMBEDDING | {"layers.0", "layers.1"},
                         2: {"layers.2", "layers.3"} | HEAD, 3: {"layers.2", "layers.3"} | HEAD},
    "pp2_dp2_gpipe_fsdp_accumulation": {0: EMBEDDING | {"layers.0", "layers.1"},
                                        1: EMBEDDING | {"layers.0", "layers.1"},
                                        2: {"layers.2", "layers.3"} | HEAD, 3: {"layers.2", "layers.3"} | HEAD},
    # interleaved: rank 0 runs stages 0 and 2, rank 1 stages 1 and 3
    "pipeline_interleaved": {0: EMBEDDING | {"layers.0", "layers.2"}, 1: {"layers.1", "layers.3"} | HEAD},
}


@pytest.mark.parametrize("name", PIPELINE_LAYOUT)
def test_pipeline_ranks_hold_their_layers_and_all_get_gradients(name, total_bytes, tmp_path_factory,
                                                                data_overrides):
    """Per-layer gradient norms are the whole model's on every rank (each rank adds the squares of its own layers
    to one all_reduce): every layer of every stage gets a gradient, while each rank holds only its stage."""
    run_dir = run(name, tmp_path_factory, data_overrides)
    layout = PIPELINE_LAYOUT[name]
    every_layer = set().union(*layout.values()) - {"lm_head"}  # the tied head counts as wte, as in one process
    for rank in layout:
        record = last_record(run_dir, rank)
        norms = {k.removeprefix("grad_norm/"): v for k, v in record.items() if k.startswith("grad_norm/")}
        assert set(norms) == every_layer, (rank, sorted(norms))
        assert all(v > 0 for v in norms.values()), (rank, norms)
        assert record["param_bytes"] < 0.75 * total_bytes  # a stage, not the model


@pytest.mark.parametrize("name,share", [("tp2_gqa", 0.5), ("hsdp2x2", 0.5), ("fsdp2_tp2_sequence_parallel", 0.25)])
def test_layouts_hold_their_fraction_of_the_parameters(name, share, tmp_path_factory, data_overrides):
    """tp splits every matrix and the embedding in two (the norms, a few hundred bytes, are whole on each tp rank);
    HSDP shards over dp_shard=2 and replicates across dp_replicate: each rank holds 1 / (dp_shard x tp), as the
    strategy says it does (the report undoes that share to count parameters)."""
    run_dir = run(name, tmp_path_factory, data_overrides)
    planned = schema.load(run_dir / "config.yaml")
    dims = traits_of(planned.strategy.name).layout(planned.strategy, planned.parallel, ranks(name))
    assert traits_of(planned.strategy.name).param_fraction(planned.strategy, dims) == share
    total = last_record(run(baseline_of(name), tmp_path_factory, data_overrides), 0)["param_bytes"]
    held = [last_record(run_dir, r)["param_bytes"] / total for r in range(ranks(name))]
    assert all(share * 0.97 <= h <= share * 1.06 for h in held), (held, share)
