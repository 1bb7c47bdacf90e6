"""train.fp8_all_gather: under FSDP the converted layers' weights are gathered in float8 (torchao's float8-castable
weights, whose FSDP2 pre-all-gather hook casts each shard), their scales precomputed after every update. On 2 real gloo
ranks on the CPU (torch's CPU float8 matmul; planning refuses fp8 on a CPU run, so the device check is lifted here):
the weights are torchao's, each update leaves a precomputed scale, and the losses follow the bf16-gathered run's to
float8's rounding. Refused in one line where nothing is gathered, or with rowwise scaling."""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from helpers import compose, spawn_ranks
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.errors import ConfigError
from gpt.model import float8
from gpt.parallel import plan_layout
from gpt.train.build import build_strategy_and_model

RUN = ("model=tiny", "model.vocab_size=64", "model.n_embd=64", "strategy=fsdp", "cluster.tasks_per_node=2",
       "train.device=cpu", "train.precision=fp8", "train.compile=true", "train.global_batch_size=8")


def _rank(rank: int, world: int, port: int, out: dict) -> None:
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.set_num_threads(1)
    float8.check_device = lambda device: None  # the CPU's float8 matmul, which a run's planning refuses
    float8.gains = lambda name, n, k, recipe: name.rsplit(".", 1)[-1] not in float8.KEPT  # the tiny model's too
    launch_config.register()
    for gather in (False, True):
        cfg = launch_config.parse(compose(*RUN, f"train.fp8_all_gather={str(gather).lower()}"))
        cfg.train.compile = False  # fp8 asks for compile on a GPU; eager on the CPU, to keep the test short
        torch.manual_seed(0)
        strategy = build_strategy_and_model(cfg, cfg.model, DistEnv(rank=rank, world_size=world), torch.device("cpu"))
        layers = [m for m in strategy.unwrapped.modules() if type(m).__name__ == "Float8Linear"]
        losses = []
        for step in range(3):
            x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(rank * 10 + step))
            losses.append(strategy.train_step([(x, x.roll(-1, 1))], 1, 1e-3, 1.0).loss.item())
        local = [m.weight._local_tensor for m in layers]  # where torchao keeps its precomputed scale
        out[(rank, gather)] = (losses, len(layers), all(isinstance(w, WeightWithDynamicFloat8CastTensor)
                                                         for w in local),
                               all(getattr(w, "_precomputed_scale", None) is not None for w in local))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # two ranks, two builds: seconds
@pytest.mark.timeout(180)
def test_fsdp_gathers_float8_weights_with_scales_precomputed_after_each_update():
    got = spawn_ranks(_rank, 2)
    bf16, n, cast, scaled = got[(0, False)]
    fp8, n_fp8, cast_fp8, scaled_fp8 = got[(0, True)]
    assert n == n_fp8 > 0
    assert (cast, scaled) == (False, False)  # without it: plain weights, gathered in bf16
    assert (cast_fp8, scaled_fp8) == (True, True)
    assert fp8 == pytest.approx(bf16, rel=0.02)  # float8's rounding of the gathered weights, not another model


@pytest.mark.parametrize("overrides,message", [
    (("strategy=ddp", "cluster.tasks_per_node=2"), r"false with strategy=ddp \(it gathers no parameters"),
    (("strategy=single",), r"false with strategy=single \(it gathers no parameters"),
])
def test_a_strategy_that_gathers_no_parameters_refuses_it(overrides, message):
    run = launch_config.parse(compose("model=tiny", "train.precision=fp8", "train.compile=true",
                                      "train.fp8_all_gather=true", "train.device=cuda", *overrides))
    with pytest.raises(ConfigError, match=rf"^train.fp8_all_gather=True is not valid: {message}"):
        plan_layout(run.strategy, run.parallel, run.model, 2, 2, run.train)


def test_it_needs_fp8_with_tensorwise_scaling():
    for overrides in (("train.precision=bf16",), ("train.precision=fp8", "train.fp8_recipe=rowwise")):
        with pytest.raises(ConfigError, match=r"^train.fp8_all_gather=True is not valid: false, or true with "
                                              r"train.precision=fp8 and train.fp8_recipe=tensorwise"):
            launch_config.parse(compose("model=tiny", "train.compile=true", "train.fp8_all_gather=true", *overrides))
