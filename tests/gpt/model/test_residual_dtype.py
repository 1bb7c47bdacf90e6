"""train.residual_dtype=bf16: the residual stream between blocks held in bf16 from the embeddings on (under autocast
it is fp32 otherwise), as FSDP's mixed precision holds it; each block then reads bf16 and the loss stays bf16's. Refused
in one line where it has no bf16 compute, and under a pipeline."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import compose, launch
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.errors import ConfigError
from gpt.parallel import plan_layout
from gpt.train.build import build_strategy_and_model


def _block_inputs(residual: str, promoted: bool = False) -> tuple[list[torch.dtype], float]:
    """Each block's input dtype in a training step, and its loss; `promoted`: the first block's output made fp32,
    as an MoE block's is under CUDA's autocast (its routing weights come out of an fp32 softmax)."""
    run = launch_config.parse(compose("model=tiny", "model.vocab_size=64", "train.device=cpu", "train.precision=bf16",
                                      f"train.residual_dtype={residual}"))
    torch.manual_seed(0)
    strategy = build_strategy_and_model(run, run.model, DistEnv(), torch.device("cpu"))
    seen = []
    for block in strategy.unwrapped.layers.values():
        block.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    if promoted:
        strategy.unwrapped.layers["0"].register_forward_hook(lambda _, args, out: out.float())
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = strategy.train_step([(x, x.roll(-1, 1))], 1, 1e-3, 1.0).loss
    return seen, loss.item()


@pytest.mark.slow  # four strategies built, a step each: seconds
@pytest.mark.parametrize("promoted", [False, True], ids=["dense", "a-block-promoting-to-fp32"])
def test_each_block_reads_a_bf16_residual_stream_and_the_loss_stays_bf16s(promoted):
    fp32, loss = _block_inputs("fp32", promoted)
    bf16, loss_bf16 = _block_inputs("bf16", promoted)
    assert set(fp32) == {torch.float32} and set(bf16) == {torch.bfloat16} and len(bf16) == len(fp32) > 1
    assert loss_bf16 == pytest.approx(loss, rel=2e-2)  # bf16's rounding of the sums, not another model


@pytest.mark.parametrize("overrides,why", [
    (("train.precision=fp32",), r"fp32 with train.precision=fp32 \(a bf16 residual stream is for bf16 compute"),
    (("train.precision=fp16",), r"fp32 with train.precision=fp16"),
])
def test_it_needs_bf16_compute(overrides, why):
    with pytest.raises(ConfigError, match=rf"^train.residual_dtype='bf16' is not valid: {why}"):
        launch_config.parse(compose("model=tiny", "train.residual_dtype=bf16", *overrides))


def test_a_pipeline_refuses_it_at_planning():
    run = launch_config.parse(compose("model=tiny", "train.precision=bf16", "train.residual_dtype=bf16",
                                      "strategy=pipeline", "cluster.tasks_per_node=2"))
    with pytest.raises(ConfigError, match=r"^train.residual_dtype='bf16' is not valid: fp32 with strategy=pipeline "
                                          r"\(each stage sends its hidden states in bf16 already"):
        plan_layout(run.strategy, run.parallel, run.model, 2, 2, run.train)


@pytest.mark.slow  # two 2-rank runs: seconds each
def test_ddp_trains_with_it_as_without_to_bf16s_rounding(tmp_path, data_overrides):
    common = ["model=tiny", "strategy=ddp", "cluster.tasks_per_node=2", "train.precision=bf16", "train.max_steps=6",
              "train.log_interval=1", "train.eval_interval=0", "checkpoint.interval_steps=0", *data_overrides]
    curves = []
    for name, extra in (("fp32", []), ("bf16", ["train.residual_dtype=bf16"])):
        launch(*common, *extra, run_dir=tmp_path / name)
        records = map(json.loads, (tmp_path / name / "metrics" / "rank0.jsonl").read_text().splitlines())
        curves.append([r["loss"] for r in records if r["kind"] == "train"])
    assert len(curves[1]) == 6 and curves[1][-1] < curves[1][0]
    assert curves[1] == pytest.approx(curves[0], rel=2e-2)
