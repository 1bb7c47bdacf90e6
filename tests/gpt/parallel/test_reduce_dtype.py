"""train.reduce_dtype=bf16 reaches each layout's gradient reduction: FSDP2's MixedPrecisionPolicy, DDP's bf16
compress hook (each bucket rounded to bf16 for its all-reduce: the gradients that come back are bf16 values), and
DeepSpeed's communication_data_type; a strategy with no reduction refuses it in one line."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from helpers import compose
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.errors import ConfigError
from gpt.parallel import plan_layout
from gpt.parallel.deepspeed import ds_config
from gpt.train.build import build_strategy_and_model


def built(*overrides: str):
    cfg = launch_config.parse(compose("model=tiny", "train.device=cpu", "model.vocab_size=64", *overrides))
    return cfg, build_strategy_and_model(cfg, cfg.model, DistEnv(), torch.device("cpu"))


def ddp_gradients(monkeypatch, *overrides: str) -> list[torch.Tensor]:
    """The gradients DDP's reduction leaves after one backward, on one gloo rank (its all-reduce still runs). torch
    registers its bf16 compress hook by that name only over NCCL (planning refuses it on a CPU run); here the same
    hook runs under another name, over gloo, which reduces bf16."""
    def bf16_on_gloo(state, bucket):
        return default_hooks.bf16_compress_hook(state, bucket)

    monkeypatch.setattr("gpt.parallel.ddp.default_hooks", SimpleNamespace(bf16_compress_hook=bf16_on_gloo))
    _, strategy = built("strategy=ddp", *overrides)
    try:
        x = torch.randint(0, 64, (2, 16))
        strategy.model(x, x)[1].backward()
        return [p.grad.clone() for p in strategy.model.parameters()]
    finally:
        dist.destroy_process_group()


def test_ddp_reduces_in_bf16_when_asked(monkeypatch):
    def in_bf16(grads):
        return all(torch.equal(g, g.bfloat16().float()) for g in grads)

    assert in_bf16(ddp_gradients(monkeypatch, "train.reduce_dtype=bf16"))
    assert not in_bf16(ddp_gradients(monkeypatch))  # fp32 gradients, reduced as they are


@pytest.mark.parametrize("precision,reduce,expected", [("fp32", "bf16", torch.bfloat16), ("bf16", "fp32", torch.float32),
                                                       ("fp32", "fp32", None)])
def test_fsdp_policy_takes_the_reduce_dtype(precision, reduce, expected):
    _, strategy = built("strategy=fsdp", f"train.precision={precision}", f"train.reduce_dtype={reduce}")
    try:
        for unit in [*strategy.model.layers.values(), strategy.model]:
            assert unit._get_fsdp_state()._mp_policy.reduce_dtype == expected
    finally:
        dist.destroy_process_group()


def test_deepspeed_communication_dtype_and_refusals():
    cfg = launch_config.parse(compose("model=tiny", "strategy=deepspeed", "model.vocab_size=64"))
    assert ds_config(cfg.strategy, "bf16", reduce_dtype="bf16")["communication_data_type"] == "bf16"
    assert ds_config(cfg.strategy, "bf16")["communication_data_type"] == "fp32"  # not the engine's bf16 default
    single = launch_config.parse(compose("model=tiny", "model.vocab_size=64", "train.reduce_dtype=bf16"))
    with pytest.raises(ConfigError, match=r"^train.reduce_dtype='bf16' is not valid: fp32 with strategy=single \(one "
                                          r"process reduces no gradients\)$"):
        plan_layout(single.strategy, single.parallel, single.model, 1, 1, single.train)
    ddp = launch_config.parse(compose("model=tiny", "model.vocab_size=64", "strategy=ddp", "train.device=cpu",
                                      "train.reduce_dtype=bf16"))
    with pytest.raises(ConfigError, match=r"fp32 with strategy=ddp on a CPU run \(torch's bf16 compress hook"):
        plan_layout(ddp.strategy, ddp.parallel, ddp.model, 2, 2, ddp.train)
