"""train.reduce_dtype=bf16 reaches each layout's gradient reduction: FSDP2's MixedPrecisionPolicy, DDP's bf16
compress hook (each bucket rounded to bf16 for its all-reduce: the gradients that come back are bf16 values), and
DeepSpeed's communication_data_type; a strategy with no reduction refuses it in one line."""
from __future__ import annotations

import os
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


def bf16_on_gloo(state, bucket):
    return default_hooks.bf16_compress_hook(state, bucket)


def _reduced_in_bf16(rank: int, world: int, port: int, out) -> None:
    """Whether the gradients DDP's reduction leaves after one backward are bf16 values, with and without
    train.reduce_dtype=bf16, on one gloo rank (its all-reduce still runs). torch registers its bf16 compress hook by
    that name only over NCCL (planning refuses it on a CPU run); here the same hook runs under another name, over
    gloo, which reduces bf16. In a process of its own that ends without tearing down: a gloo group freed while its
    worker thread still drops the hook's Python callback waits for the GIL its freeing thread holds (a deadlock)."""
    import gpt.parallel.ddp as ddp_module

    launch_config.register()  # what tests/conftest.py does in the test process
    ddp_module.default_hooks = SimpleNamespace(bf16_compress_hook=bf16_on_gloo)
    kept = []  # never freed: see above
    for name, overrides in (("bf16", ["train.reduce_dtype=bf16"]), ("fp32", [])):
        _, strategy = built("strategy=ddp", *overrides)
        x = torch.randint(0, 64, (2, 16))
        strategy.model(x, x)[1].backward()
        out[name] = all(torch.equal(p.grad, p.grad.bfloat16().float()) for p in strategy.model.parameters())
        kept.append(strategy)
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.slow  # a process that imports torch: seconds of CPU
def test_ddp_reduces_in_bf16_when_asked():
    from helpers import spawn_ranks

    assert spawn_ranks(_reduced_in_bf16, 1) == {"bf16": True, "fp32": False}  # fp32 gradients, reduced as they are


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
