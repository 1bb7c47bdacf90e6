"""train.compile=true under each data and tensor-parallel layout: every transformer block compiled in place before
the layout wraps or shards it (the embeddings, head and loss eager), trained in real gloo process groups, follows
the eager one-process run of the same model; its checkpoint loads into a plain, uncompiled GPT under the GPT's own
names."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import compose, launch, losses, spread
from gpt.checkpoint.writer import load_model
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.train.build import build_strategy_and_model
from strategy_runs import COMMON, GQA, STEPS, TP, baseline_of, max_rel_diff, run, val_losses

# Inductor fuses and reorders fp32 reductions: compiled and eager losses differed by about 1e-7 relative over 4
# steps in every case below. A wrong gradient moves them by far more: before the embedding's all-reduce was waited
# for in eager (gpt.parallel.tensor), compiled tensor-parallel blocks moved the second step's loss by 2e-3.
COMPILED_RTOL = 1e-4
# The evaluation after the last update reads weights that ten AdamW updates moved apart: AdamW divides each gradient by
# its own running size, so where a gradient is rounding noise (the k projection's bias, which softmax makes
# gradient-free) two orders of reduction give updates of a whole learning rate in different directions. On an AMD
# EPYC whole-model compiled DDP's weights ended up to 0.3% apart with the train losses within 3e-5, and its last
# validation loss 6e-4 relative from eager's; the train losses above still catch a wrong gradient (2e-3).
VAL_RTOL = 2e-3
CASES = {
    "ddp": ["strategy=ddp", "nodes=2"],
    "fsdp": ["strategy=fsdp", "cluster.tasks_per_node=2"],
    # the first block's input is the tensor-parallel embedding's all-reduce (RoPE: nothing eager consumes it first).
    # HSDP compiles its blocks as FSDP does (a mesh dimension more around them), sequence parallelism as this case
    # (a reduce-scatter in place of the all-reduce; test_equivalence trains it eager): each case compiles for minutes
    # of CPU, so the suite keeps one of each family
    "tp2_gqa": [*TP, *GQA, "cluster.tasks_per_node=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_compiled_layout_trains_as_one_eager_process(name, tmp_path, tmp_path_factory, data_overrides):
    baseline = run(baseline_of(name), tmp_path_factory, data_overrides)
    run_dir = tmp_path / name
    launch(*COMMON, *data_overrides, *CASES[name], "train.compile=true", run_dir=run_dir)
    expected, got = losses(baseline), losses(run_dir)
    assert len(got) == STEPS and expected[-1] < expected[0] - 0.5
    assert max_rel_diff(expected, got) <= COMPILED_RTOL, (expected, got)
    assert max_rel_diff(val_losses(baseline), val_losses(run_dir)) <= VAL_RTOL
    eager, _, _ = load_model(baseline)
    compiled, _, _ = load_model(run_dir)  # a plain GPT: the checkpoint's names are the model's, no `_orig_mod`
    assert {k: v.shape for k, v in compiled.state_dict().items()} == {k: v.shape for k, v in eager.state_dict().items()}

# train=gpu's compile under DDP: the whole model with its loss, which DDP's optimizer (torch._dynamo's optimize_ddp)
# splits at DDP's buckets; this model's 1.6 MB of gradients fill two of 1 MiB, and the graph is split in four
WHOLE_MODEL_DDP = ["strategy=ddp", "nodes=2", "model.n_embd=128", "strategy.bucket_cap_mb=1"]


@pytest.mark.slow
def test_ddp_trains_the_whole_compiled_model_as_eager_ddp(tmp_path, data_overrides):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    launch(*COMMON, *data_overrides, *WHOLE_MODEL_DDP, run_dir=eager)
    launch(*COMMON, *data_overrides, *WHOLE_MODEL_DDP, "train.compile=true", "train.compile_scope=auto",
           run_dir=compiled)
    expected, got = losses(eager), losses(compiled)
    assert len(got) == STEPS and expected[-1] < expected[0] - 0.5
    assert max_rel_diff(expected, got) <= COMPILED_RTOL, (expected, got)
    assert max_rel_diff(val_losses(eager), val_losses(compiled)) <= VAL_RTOL


@pytest.mark.parametrize("strategy", spread("strategy", ["single", "ddp", "zero1", "fsdp"], 2))
def test_compile_wraps_each_block_in_place_and_leaves_the_loss_eager(strategy, tmp_path):
    """The wiring, in one process: each block's call is compiled (nothing compiles until it runs), the GPT
    itself and its head are not, and parameter names are the model's."""
    cfg = launch_config.parse(compose("model=tiny", f"strategy={strategy}", "train.compile=true", "train.device=cpu",
                             "model.vocab_size=64"))
    built = build_strategy_and_model(cfg, cfg.model, DistEnv(), torch.device("cpu"))
    model = built.unwrapped
    assert all(block._compiled_call_impl is not None for block in model.layers.values())
    assert model._compiled_call_impl is None and model.lm_head._compiled_call_impl is None
    assert not any("_orig_mod" in name for name, _ in built.model.named_parameters())
    if dist.is_initialized():  # the one-rank group the distributed strategies made
        dist.destroy_process_group()


def test_ddp_compiles_the_whole_model_inside_its_wrapper_and_splits_it_at_its_buckets():
    """train=gpu's compile under DDP, as the build leaves it (nothing compiles until it runs): the GPT compiled whole,
    in place, inside DDP's wrapper, whose buckets (each .grad a view into one) DDP's optimizer in torch._dynamo
    splits the graph at, so that each bucket's all-reduce starts as its part of the backward ends."""
    cfg = launch_config.parse(compose("model=tiny", "strategy=ddp", "train=gpu", "train.device=cpu",
                                      "train.precision=fp32", "model.vocab_size=64"))
    built = build_strategy_and_model(cfg, cfg.model, DistEnv(), torch.device("cpu"))
    try:
        assert built.compile.scope == "model" and built.unwrapped._compiled_call_impl is not None
        assert built.model.gradient_as_bucket_view and torch._dynamo.config.optimize_ddp
    finally:
        dist.destroy_process_group()
