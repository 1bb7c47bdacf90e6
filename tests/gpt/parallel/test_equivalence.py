"""Every strategy trains exactly as one process does: the same losses (train and validation), step by step, on
every rank, the same per-layer gradient norms, and the same weights in its final checkpoint."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers import losses, read_metrics
from gpt.checkpoint.writer import load_model
from strategy_runs import (BF16_CASES, BF16_RTOL, CASES, FP32_RTOL, STEPS, baseline_of, max_rel_diff, ranks,
                           run, val_losses)

pytestmark = pytest.mark.slow  # each case trains its strategy through `python -m launch`

BANNERS = {
    "ddp": "DDP, 2 replicas on 2 rank(s), 2 node(s)",
    "fsdp": "FSDP2 (fully_shard), parameters sharded over mesh dp_shard=2",
    "fsdp_checkpointing_accumulation": "activation checkpointing full",
    "zero1": "ZeRO-1 (ZeroRedundancyOptimizer over DDP), optimizer state split over 2 ranks",
    "deepspeed_zero1": "DeepSpeed ZeRO-1 over 2 data-parallel ranks",
    "deepspeed_zero2_accumulation": "DeepSpeed ZeRO-2 over 2 data-parallel ranks",
    "deepspeed_zero3": "DeepSpeed ZeRO-3 over 2 data-parallel ranks: parameters, gradients and optimizer state",
    "pipeline_gpipe": "pipeline gpipe, mesh pp=2 x dp=1 (2 stages, 4 micro-batches",
    "pipeline_interleaved": "pipeline interleaved, mesh pp=2 x dp=1 (4 stages",
    "pp2_dp2_1f1b_ddp": "pipeline 1f1b, mesh pp=2 x dp=2 (2 stages, 4 micro-batches, DDP inside stages",
    "pp2_dp2_1f1b_ddp_default_microbatches": "pipeline 1f1b, mesh pp=2 x dp=2 (2 stages, 2 micro-batches, DDP inside",
    "pp2_dp2_interleaved_ddp": "pipeline interleaved, mesh pp=2 x dp=2 (4 stages",
    "pp2_dp2_gpipe_fsdp_accumulation": "pipeline gpipe, mesh pp=2 x dp=2 (2 stages, 4 micro-batches, FSDP inside",
    "tp2_gqa": "layout       tp=2 (node 0: ranks 0-1)",
    "tp2_sequence_parallel_gqa": "tensor parallel over tp=2 with sequence parallel",
    "fsdp2_tp2_sequence_parallel": "layout       dp_shard=2 x tp=2, sequence parallel (node 0: ranks 0-3)",
    "hsdp2x2": "HSDP (fully_shard), parameters sharded over mesh dp_replicate=2 x dp_shard=2",
    "pp2_tp2_recompute": "pipeline 1f1b, mesh pp=2 x dp=1 x tp=2 (2 stages",
    "pp2_dp2_tp2": "layout       pp=2 x dp_shard=2 x tp=2 (node 0: ranks 0-3, node 1: ranks 4-7)",
}


@pytest.fixture
def baseline(request, tmp_path_factory, data_overrides):
    """The one-process run on the same model as the case the test is parametrized with."""
    return run(baseline_of(request.node.callspec.params["name"]), tmp_path_factory, data_overrides)


@pytest.mark.parametrize("name", CASES)
def test_losses_match_one_process(name, baseline, tmp_path_factory, data_overrides):
    run_dir = run(name, tmp_path_factory, data_overrides)
    expected, got = losses(baseline), losses(run_dir)
    assert len(got) == STEPS
    assert expected[-1] < expected[0] - 0.5  # it trains: a wrong gradient would show
    assert max_rel_diff(expected, got) <= FP32_RTOL, (expected, got)
    if not any(o.startswith("train.micro_batch_size=") for o in CASES[name][0]):  # else other val batches
        assert max_rel_diff(val_losses(baseline), val_losses(run_dir)) <= FP32_RTOL
    for rank in range(1, ranks(name)):  # every rank logs the global loss, whatever stage it runs
        assert losses(run_dir, rank) == pytest.approx(got, rel=1e-6)
    log = (run_dir / "launcher.log").read_text()
    assert BANNERS[name] in log
    assert "shm_comm" not in log  # DeepSpeed's shared-memory all-reduce serves inference only: never built here
    noise = [line for line in log.splitlines() if re.search(r"\w+Warning: |\[WARNING\] \[", line)]
    assert not noise, noise  # a library's warning (a deprecated name, a guessed device) in every rank's log


@pytest.mark.parametrize("name", CASES)
def test_final_checkpoint_holds_the_same_weights(name, baseline, tmp_path_factory, data_overrides):
    """save_state of each strategy writes the whole model (every stage, every shard) under the GPT's names."""
    expected, _, _ = load_model(baseline)
    got, meta, _ = load_model(run(name, tmp_path_factory, data_overrides))
    assert meta["step"] == STEPS
    got_state = got.state_dict()
    for key, value in expected.state_dict().items():
        # Adam turns the zero gradient of k_proj.bias into updates of about 1e-5 driven by rounding noise.
        torch.testing.assert_close(got_state[key], value, rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("name", BF16_CASES)
def test_bf16_losses_stay_within_the_bf16_bound(name, baseline, tmp_path_factory, data_overrides):
    got = losses(run(name, tmp_path_factory, data_overrides))
    diff = max_rel_diff(losses(baseline), got)
    assert diff <= BF16_RTOL, got
    assert diff > 1e-5  # bf16 is really in use


@pytest.mark.parametrize("name", CASES)
def test_per_layer_gradient_norms_match_one_process(name, baseline, tmp_path_factory, data_overrides):
    """Each rank sums the squares of the gradient part it holds (a shard once, a replica once per copy) and one
    all_reduce adds them up: every layer's norm is the one a single process sees, on every rank."""
    def norms(run_dir: Path, rank: int = 0) -> dict[str, float]:
        return {k: v for k, v in read_metrics(run_dir, rank)[0].items() if k.startswith("grad_norm/")}

    expected, run_dir = norms(baseline), run(name, tmp_path_factory, data_overrides)
    assert len(expected) > 2
    for rank in range(ranks(name)):
        got = norms(run_dir, rank)
        assert got.keys() == expected.keys(), rank
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4), (rank, key)
