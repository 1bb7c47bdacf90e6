"""train.fused_qkv: q, k and v as one matmul, their weights still three parameters. The same forward and gradients
as three matmuls (multi-head with biases as GPT-2, grouped-query as LLaMA), one compiled graph, the same training
under FSDP's per-block wrapping, and refused in one line where a rank's q, k and v are not whole as its forward runs."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import compose, launch
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.config.model import ModelConfig
from gpt.errors import ConfigError
from gpt.model.transformer import GPT
from gpt.parallel import plan_layout
from gpt.train.build import build_strategy_and_model

SHAPES = {"gpt2": dict(bias=True), "llama": dict(norm="rmsnorm", position="rope", mlp="swiglu", n_query_groups=2)}


def _pair(shape: str) -> tuple[GPT, GPT]:
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=96, **SHAPES[shape])
    torch.manual_seed(0)
    plain = GPT(cfg)
    fused = GPT(cfg)
    fused.load_state_dict(plain.state_dict())
    for block in fused.layers.values():
        block.attn.fused_qkv = True
    return plain, fused


@pytest.mark.parametrize("shape", list(SHAPES))
def test_one_matmul_gives_the_three_matmuls_outputs_and_gradients(shape):
    plain, fused = _pair(shape)
    assert fused.state_dict().keys() == plain.state_dict().keys()  # checkpoints and exports see no difference
    x = torch.randint(0, 96, (3, 32))
    losses = [model(x, x.roll(-1, 1))[1] for model in (plain, fused)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    grads = {name: p.grad for name, p in plain.named_parameters()}
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow  # builds two strategies and trains a step: a second
def test_the_trainer_builds_every_layer_fused_when_asked():
    run = launch_config.parse(compose("model=tiny", "model.vocab_size=64", "train.device=cpu", "train.fused_qkv=true"))
    strategy = build_strategy_and_model(run, run.model, DistEnv(), torch.device("cpu"))
    assert [block.attn.fused_qkv for block in strategy.unwrapped.layers.values()] == [True] * run.model.n_layer
    x = torch.randint(0, run.model.vocab_size, (2, 16))
    assert torch.isfinite(strategy.train_step([(x, x)], 1, 1e-3, 1.0).loss)
    default = launch_config.parse(compose("model=tiny", "model.vocab_size=64", "train.device=cpu"))
    plain = build_strategy_and_model(default, default.model, DistEnv(), torch.device("cpu"))
    assert not any(block.attn.fused_qkv for block in plain.unwrapped.layers.values())


@pytest.mark.slow  # compiles a tiny model on the CPU: seconds
def test_the_fused_projection_compiles_as_one_graph():
    torch._dynamo.reset()  # what other tests compiled does not make this one's shapes symbolic
    _, fused = _pair("gpt2")
    x = torch.randint(0, 96, (2, 32))
    eager = fused(x, x)[1]
    compiled = torch.compile(fused, fullgraph=True)(x, x)[1]  # fullgraph: a graph break fails here
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides,why", [
    (("strategy=fsdp", "parallel.tp=2", "cluster.tasks_per_node=2"), r"tensor parallelism \(parallel.tp > 1"),
    (("strategy=deepspeed", "strategy.stage=3", "cluster.tasks_per_node=2"), "ZeRO-3 gathers each layer's weights"),
])
def test_layouts_whose_q_k_and_v_are_not_whole_refuse_it_at_planning(overrides, why):
    run = launch_config.parse(compose("model=tiny", "train.fused_qkv=true", *overrides))
    with pytest.raises(ConfigError, match=rf"^train.fused_qkv=True is not valid: false with .*{why}"):
        plan_layout(run.strategy, run.parallel, run.model, 2, 2, run.train)
    plain = launch_config.parse(compose("model=tiny", *overrides))
    plan_layout(plain.strategy, plain.parallel, plain.model, 2, 2, plain.train)  # the layout itself is fine
    with pytest.raises(ConfigError, match=r"^train.fused_qkv=True is not valid: false with train.precision=fp8"):
        launch_config.parse(compose("model=tiny", "train.fused_qkv=true", "train.precision=fp8", "train.compile=true"))


@pytest.mark.slow  # two 2-rank runs: seconds each
def test_fsdp_trains_alike_with_and_without_it(tmp_path, data_overrides):
    """FSDP2 gathers each block's weights before its forward: the fused matmul reads them whole, and the reduced
    gradients of q, k and v are those of three matmuls."""
    common = ["model=tiny", "strategy=fsdp", "cluster.tasks_per_node=2", "train.max_steps=4", "train.log_interval=1",
              "train.eval_interval=0", "checkpoint.interval_steps=0", *data_overrides]
    curves = []
    for name, extra in (("plain", []), ("fused", ["train.fused_qkv=true"])):
        launch(*common, *extra, run_dir=tmp_path / name)
        records = map(json.loads, (tmp_path / name / "metrics" / "rank0.jsonl").read_text().splitlines())
        curves.append([r["loss"] for r in records if r["kind"] == "train"])
    assert len(curves[0]) == 4
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)
