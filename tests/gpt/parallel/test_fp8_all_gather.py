"""train.fp8_all_gather: under FSDP the converted layers' weights are gathered in float8 (torchao's float8-castable
weights, whose FSDP2 pre-all-gather hook casts each shard), their scales precomputed after every update. On 2 real gloo
ranks on the CPU (torch's CPU float8 matmul; planning refuses fp8 on a CPU run, so the device check is lifted here):
the weights are torchao's, each update leaves a precomputed scale, a load (a resume, a rollback) the scale of the
weights it loaded, and the losses follow the bf16-gathered run's to float8's rounding; the first step's memory is
measured through torchao's wrapper (it holds no storage of its own). Refused in one line where nothing is gathered,
with CPU offload, or with rowwise scaling."""
from __future__ import annotations

import datetime
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import compose, spawn_ranks
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.errors import ConfigError
from gpt.model import float8
from gpt.parallel import plan_layout
from gpt.parallel.memory_held import MeasuredStep
from gpt.train.build import build_strategy_and_model

RUN = ("model=tiny", "model.vocab_size=64", "model.n_embd=64", "strategy=fsdp", "cluster.tasks_per_node=2",
       "train.device=cpu", "train.precision=fp8", "train.compile=true", "train.global_batch_size=8")


def _step(strategy, rank: int, i: int) -> float:
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(rank * 10 + i))
    return strategy.train_step([(x, x.roll(-1, 1))], 1, 1e-3, 1.0).loss.item()


def _scales(layers: list[torch.nn.Module]) -> list[float | list | None]:
    """Each weight's precomputed float8 scale, where torchao keeps it, as plain values (for the shared dict)."""
    scales = [getattr(m.weight._local_tensor, "_precomputed_scale", None) for m in layers]
    return [None if s is None else s.tolist() for s in scales]


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
        with MeasuredStep(strategy, 1) as first:  # the trainer's first-step memory record
            losses = [_step(strategy, rank, 0)]
        losses += [_step(strategy, rank, i) for i in (1, 2)]
        local = [m.weight._local_tensor for m in layers]
        out[(rank, gather)] = (losses, len(layers), all(isinstance(w, WeightWithDynamicFloat8CastTensor)
                                                         for w in local),
                               all(s is not None for s in _scales(layers)), first.parts.params)
        if gather:  # a rollback: the weights of step 3 loaded back after a fourth update
            folder = Path(tempfile.gettempdir()) / f"fp8-gather-{port}"
            strategy.save_state(folder)
            saved = _scales(layers)
            _step(strategy, rank, 3)
            moved = _scales(layers)
            strategy.load_state(folder)
            out[(rank, "load")] = (saved, moved, _scales(layers))
            dist.barrier()
            if rank == 0:
                shutil.rmtree(folder)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # two ranks, two builds: seconds
@pytest.mark.timeout(180)
def test_fsdp_gathers_float8_weights_with_scales_precomputed_after_each_update():
    got = spawn_ranks(_rank, 2)
    bf16, n, cast, scaled, params = got[(0, False)]
    fp8, n_fp8, cast_fp8, scaled_fp8, params_fp8 = got[(0, True)]
    assert n == n_fp8 > 0
    assert (cast, scaled) == (False, False)  # without it: plain weights, gathered in bf16
    assert (cast_fp8, scaled_fp8) == (True, True)
    assert params_fp8 == params > 0  # each wrapped shard counted by the storage it wraps, none twice
    assert fp8 == pytest.approx(bf16, rel=0.02)  # float8's rounding of the gathered weights, not another model
    saved, moved, loaded = got[(0, "load")]
    assert saved != moved  # the fourth update moved the scales
    assert saved == loaded  # the load gave back the loaded weights' scales


@pytest.mark.parametrize("overrides,message", [
    (("strategy=ddp", "cluster.tasks_per_node=2"), r"false with strategy=ddp \(it gathers no parameters"),
    (("strategy=single",), r"false with strategy=single \(it gathers no parameters"),
])
def test_a_strategy_that_gathers_no_parameters_refuses_it(overrides, message):
    run = launch_config.parse(compose("model=tiny", "train.precision=fp8", "train.compile=true",
                                      "train.fp8_all_gather=true", "train.device=cuda", *overrides))
    with pytest.raises(ConfigError, match=rf"^train.fp8_all_gather=True is not valid: {message}"):
        plan_layout(run.strategy, run.parallel, run.model, 2, 2, run.train)


def test_cpu_offload_refuses_it():
    """FSDP moves an offloaded shard back with .to(device), a new float8-castable weight without its scale."""
    run = launch_config.parse(compose("model=tiny", "train.precision=fp8", "train.compile=true", "train.device=cuda",
                                      "train.fp8_all_gather=true", "strategy=fsdp", "strategy.cpu_offload=true",
                                      "cluster.tasks_per_node=2"))
    with pytest.raises(ConfigError, match=r"^train.fp8_all_gather=True is not valid: false with "
                                          r"strategy.cpu_offload=true \(each shard comes back"):
        plan_layout(run.strategy, run.parallel, run.model, 2, 2, run.train)


def test_it_needs_fp8_with_tensorwise_scaling():
    for overrides in (("train.precision=bf16",), ("train.precision=fp8", "train.fp8_recipe=rowwise")):
        with pytest.raises(ConfigError, match=r"^train.fp8_all_gather=True is not valid: false, or true with "
                                              r"train.precision=fp8 and train.fp8_recipe=tensorwise"):
            launch_config.parse(compose("model=tiny", "train.compile=true", "train.fp8_all_gather=true", *overrides))
