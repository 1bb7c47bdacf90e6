"""The validation set is the run's, fixed by its seed, block size, global batch size and eval_batches: the same
weights score the same validation loss whatever the micro-batch size (gradient accumulation) and the number of
data-parallel ranks, which only change how the set is split into forward passes."""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import compose, spawn_ranks
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.data import ensure_prepared
from gpt.train.build import build_strategy_and_model, model_config, open_data
from gpt.train.evaluation import validation_loss

CPU = torch.device("cpu")
RUN = ["model=tiny", "train.device=cpu", "train.global_batch_size=8", "train.eval_batches=2"]


def val_loss(data_overrides: list[str], *overrides: str, env: DistEnv = DistEnv()) -> float:
    """The validation loss of the run's freshly initialised weights (the same seed: the same weights everywhere)."""
    run = launch_config.parse(compose(*RUN, *data_overrides, *overrides))
    ensure_prepared(run.data)
    model_cfg = model_config(run.model, Path(run.data.dir))
    strategy = build_strategy_and_model(run, model_cfg, env, CPU)
    data = open_data(run, model_cfg, strategy, CPU)
    data.prefetch.close()
    return validation_loss(strategy, data.val, lambda: False)


def _ddp_rank(rank: int, world: int, port: int, out) -> None:
    launch_config.register()  # what tests/conftest.py does in the test process
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    out[rank] = val_loss(out["data"], "strategy=ddp", "train.micro_batch_size=2", env=env)
    dist.barrier()
    dist.destroy_process_group()


def test_the_micro_batch_size_does_not_change_the_validation_loss(prepared_data):
    whole = val_loss(prepared_data)
    assert val_loss(prepared_data, "train.micro_batch_size=2") == pytest.approx(whole, abs=1e-5)


@pytest.mark.slow  # two processes that import torch: seconds of CPU
@pytest.mark.timeout(300)
def test_two_data_parallel_ranks_score_the_validation_loss_of_one(prepared_data):
    got = spawn_ranks(_ddp_rank, 2, {"data": prepared_data})
    assert got[0] == got[1] == pytest.approx(val_loss(prepared_data), abs=1e-5)


def test_a_mixture_of_experts_validation_loss_is_the_cross_entropy_without_the_router_term(prepared_data):
    run = launch_config.parse(compose(*RUN, *prepared_data, "model.n_expert=4", "model.moe_aux_loss_weight=1.0"))
    ensure_prepared(run.data)
    model_cfg = model_config(run.model, Path(run.data.dir))
    strategy = build_strategy_and_model(run, model_cfg, DistEnv(), CPU)
    data = open_data(run, model_cfg, strategy, CPU)
    data.prefetch.close()
    batches = list(data.val)
    with torch.no_grad():
        ce = [torch.nn.functional.cross_entropy(strategy.model(x)[0].flatten(0, 1), y.flatten()) for x, y in batches]
        trained = [strategy.model(x, y)[1] for x, y in batches]  # the training loss: its router term is ~1 here
    expected = float(torch.stack(ce).mean())
    assert float(torch.stack(trained).mean()) > expected + 0.5
    assert validation_loss(strategy, batches, lambda: False) == pytest.approx(expected, rel=1e-5)
