"""The attention kernel (train.attention) and what torch.compile covers (train.compile_scope, train.compile_mode),
and the GPU preset (train=gpu) that sets them: the kernel a model runs under sdpa_kernel on this CPU, a named kernel
that cannot run refused in one line (at planning where the device says so, else at start-up), and the mode and
scope reaching torch.compile."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from helpers import compose, make_plan_of
from gpt.config.model import ModelConfig
from launch import launch_config
from gpt.config.train import TrainConfig
from gpt.collectives.process_group import DistEnv
from gpt.errors import ConfigError, UserError
from gpt.model import attention
from gpt.model.transformer import GPT
from gpt.train.build import build_strategy_and_model

TINY = ModelConfig(n_layer=2, n_head=4, n_query_groups=2, n_embd=32, block_size=16, vocab_size=64)
CPU = torch.device("cpu")


def kernel_run(kernel: str) -> str:
    """The SDPA kernel a training forward and backward of the GQA model dispatched under train.attention=kernel."""
    model = GPT(TINY)
    for block in model.layers.values():
        block.attn.kernels = attention.backends(kernel)
    seen = attention.KernelSeen()
    x = torch.randint(0, 64, (2, 16))
    with seen:
        model(x, x)[1].backward()
    return seen.kernel


@pytest.mark.parametrize("kernel", ["math", "flash"])
def test_a_named_kernel_is_the_one_the_model_runs_on_a_cpu(kernel):
    """This CPU has SDPA's math kernel and its CPU Flash kernel (fp32 and bf16, grouped-query too)."""
    assert kernel_run(kernel) == kernel


@pytest.mark.parametrize("kernel", ["efficient", "cudnn"])
def test_a_kernel_the_cpu_lacks_is_refused_not_replaced(kernel):
    with pytest.raises(RuntimeError, match="No viable backend"):  # SDPA itself: no fallback under sdpa_kernel
        kernel_run(kernel)
    with pytest.raises(UserError) as e:
        attention.check(TINY, kernel, CPU, torch.float32)
    message = str(e.value)
    assert message.startswith(f"train.attention={kernel} is not valid: SDPA's {kernel} kernel cannot run")
    assert "on cpu in float32" in message and "train.attention=auto" in message and "\n" not in message


def test_auto_reports_what_sdpa_chose_here():
    assert attention.check(TINY, "auto", CPU, torch.bfloat16) == kernel_run("auto") == "flash"
    assert attention.check(TINY, "math", CPU, torch.float32) == "math"


def test_planning_refuses_what_the_device_says_cannot_run(tmp_path, data_overrides):
    cfg = launch_config.parse(compose("model=tiny", "train.attention=cudnn", "train.device=cpu", *data_overrides))
    with pytest.raises(ConfigError, match=r"^train.attention='cudnn' is not valid: auto, flash or math on a CPU run"):
        make_plan_of(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    train = TrainConfig(attention="flash")  # fp32, the default precision
    with pytest.raises(ConfigError, match=r"with train.precision=fp32 \(the flash kernel takes bf16 or fp16 on a GPU"):
        train.check_attention("cuda")
    dataclasses.replace(train, precision="bf16").check_attention("cuda")
    TrainConfig(attention="efficient").check_attention("cuda")


def built(monkeypatch, *overrides: str):
    """The strategy a rank builds for `overrides`, with torch.compile recording its arguments instead of compiling."""
    calls = []

    def record(model=None, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", record)
    cfg = launch_config.parse(compose("model=tiny", "train.device=cpu", "model.vocab_size=64", *overrides))
    try:
        return build_strategy_and_model(cfg, cfg.model, DistEnv(), CPU), calls
    finally:
        if dist.is_initialized():  # the one-rank group a distributed strategy made
            dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["single", "ddp", "zero1"])
def test_the_gpu_preset_compiles_the_whole_model_with_its_loss(strategy, monkeypatch):
    strategy_built, calls = built(monkeypatch, "train=gpu", f"strategy={strategy}", "train.compile_mode=max-autotune")
    assert calls == [{"mode": "max-autotune"}]  # one graph: GPT.forward, the loss included
    assert strategy_built.compile.scope == "model" and strategy_built.attention_kernel == "flash"
    assert strategy_built.precision == "bf16"
    assert all(b.attn.kernels is None for b in strategy_built.unwrapped.layers.values())


def test_fsdp_compiles_each_block_under_the_preset_and_refuses_the_whole_model(monkeypatch, tmp_path,
                                                                               data_overrides):
    strategy_built, calls = built(monkeypatch, "train=gpu", "strategy=fsdp", "train.compile_mode=reduce-overhead")
    assert calls == [{"fullgraph": True, "mode": "reduce-overhead"}] * 2  # tiny has two blocks
    cfg = launch_config.parse(compose("model=tiny", "strategy=fsdp", "train.compile=true", "train.compile_scope=model",
                             "train.device=cpu", *data_overrides))
    with pytest.raises(ConfigError, match=r"^train.compile_scope='model' is not valid: blocks or auto with "
                                          r"strategy=fsdp"):
        make_plan_of(cfg, tmp_path / "run")


@pytest.mark.parametrize("strategy", ["ddp", "zero1"])
def test_ddp_refuses_buckets_below_its_first_under_the_whole_model_compile(strategy, tmp_path, data_overrides):
    """torch's DDP optimizer, which splits a whole compiled model at DDP's buckets, fails at the first step on a
    bucket smaller than DDP's first (1 MiB); each block compiled, DDP runs with any."""
    overrides = ("model=tiny", f"strategy={strategy}", "train=gpu", "train.device=cpu", "strategy.bucket_cap_mb=0.5",
                 *data_overrides)
    with pytest.raises(ConfigError, match=r"^strategy.bucket_cap_mb=0.5 is not valid: 1 or more with train.compile "
                                          r"and train.compile_scope=auto"):
        make_plan_of(launch_config.parse(compose(*overrides)), tmp_path / "run")
    assert make_plan_of(launch_config.parse(compose(*overrides, "train.compile_scope=blocks")), tmp_path / "blocks")


def test_a_named_kernel_reaches_every_layer(monkeypatch):
    strategy_built, calls = built(monkeypatch, "train.attention=math")
    assert calls == [] and strategy_built.attention_kernel == "math"
    assert all(b.attn.kernels == [torch.nn.attention.SDPBackend.MATH]
               for b in strategy_built.unwrapped.layers.values())


@pytest.mark.parametrize("strategy", ["single", "fsdp"])
def test_the_gpu_preset_plans_on_any_strategy_that_compiles(strategy, tmp_path, data_overrides):
    cfg = launch_config.parse(compose("train=gpu", "model=tiny", f"strategy={strategy}", "train.device=cpu", *data_overrides))
    train = cfg.train
    assert (train.precision, train.compile, train.compile_scope, train.attention) == ("bf16", True, "auto", "auto")
    assert train.log_interval == 50 and not train.layer_grad_norms
    assert make_plan_of(cfg, tmp_path / "run").world_size == 1


GPU_JOB = ("train=gpu", "model=tiny", "cluster=slurm", "cluster.gpus_per_node=1", "cluster.tasks_per_node=1")


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
@pytest.mark.slow
def test_cuda_graphs_with_gradient_accumulation_are_refused_at_planning(mode, tmp_path, data_overrides):
    """Both modes replay CUDA graphs on a GPU, and a replay writes its outputs where the one before wrote them: with
    4 micro-steps per optimizer step each would overwrite the gradients of the one before (torch refuses it at run
    time). Refused at planning in one line, before anything is prepared or written; one micro-step, the default
    mode, a CPU run (no CUDA graphs) or an eager run plan."""
    accumulating = [*GPU_JOB, f"train.compile_mode={mode}", "train.global_batch_size=8", "train.micro_batch_size=2",
                    *data_overrides]
    with pytest.raises(ConfigError) as refused:
        make_plan_of(launch_config.parse(compose(*accumulating)), tmp_path / "run")
    assert str(refused.value) == (
        f"train.compile_mode='{mode}' is not valid: default with 4 micro-steps per optimizer step "
        "(train.micro_batch_size=2 of a per-rank batch of 8: CUDA graphs replay into the same buffers, so a micro-step "
        "would overwrite the gradients of the one before); or train.micro_batch_size=8, one micro-step")
    assert not (tmp_path / "run").exists()
    for valid in ("train.micro_batch_size=8", "train.compile_mode=default", "train.device=cpu", "train.compile=false"):
        make_plan_of(launch_config.parse(compose(*accumulating, valid)), tmp_path / valid)


def test_fsdp_with_cuda_graphs_is_refused_at_planning(tmp_path, data_overrides):
    cfg = launch_config.parse(compose(*GPU_JOB, "strategy=fsdp", "train.compile_mode=reduce-overhead", *data_overrides))
    with pytest.raises(ConfigError, match=r"^train.compile_mode='reduce-overhead' is not valid: default with "
                                          r"strategy=fsdp \(FSDP frees each block's gathered parameters .*\); "
                                          r"reduce-overhead with single, ddp or zero1$"):
        make_plan_of(cfg, tmp_path / "run")
    make_plan_of(dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, name="single")), tmp_path / "run")


@pytest.mark.slow  # three compilations on the CPU: seconds
def test_a_compiled_model_runs_a_second_and_third_sequence_length():
    """A second length makes torch.compile's T symbolic: `T > 1` was then a SymBool, which SDPA's is_causal refuses
    (TypeError at the second length: an evaluation or task of other lengths beside training would have failed)."""
    torch._dynamo.reset()  # this test's lengths alone decide what is symbolic
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=64))
    compiled = torch.compile(model, fullgraph=True)
    for T in (16, 24, 32):
        x = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(T))
        torch.testing.assert_close(compiled(x, x)[1], model(x, x)[1], rtol=1e-4, atol=1e-5)
