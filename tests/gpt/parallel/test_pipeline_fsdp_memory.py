"""A pipeline with FSDP inside its stages (strategy.dp=fsdp) holds more than FSDP alone: torch's schedules run each
micro-batch's backward with the gradients' reduction off and the parameters left gathered, and reduce only at the
step's end. The planner's estimate (gpt.parallel.memory_estimate) counts what each rank holds then, measured on 4
real gloo ranks (pp=2 x dp_shard=2) as the schedule starts its reduction."""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining.stage import _PipelineStageBase

from helpers import compose, spawn_ranks
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.parallel.layout import ParallelDims
from gpt.model.flops import param_count
from gpt.parallel.memory_estimate import estimate, gathered_bytes, rank_params
from gpt.parallel.traits import traits_of
from gpt.train.build import build_strategy_and_model

RUN = ("model=tiny", "model.vocab_size=64", "strategy=pipeline", "strategy.dp=fsdp", "strategy.microbatches=4",
       "train.device=cpu", "cluster.tasks_per_node=4", "train.precision=bf16", "train.global_batch_size=16")
BATCH = 8  # sequences per replica and step: the schedule's 4 micro-batches of 2


def unsharded(stage: _PipelineStageBase) -> tuple[int, int]:
    """(gradients, parameters) that FSDP2 holds unsharded in the stage's module now (torch 2.13's FSDPParam: an
    accumulated gradient in the reduce dtype, or the unsharded parameter's own; a gathered parameter's storage)."""
    grads = params = 0
    for module in (m for m in stage.submod.modules() if isinstance(m, FSDPModule)):
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for param in group.fsdp_params:
                grad = param.unsharded_accumulated_grad
                grad = grad if grad is not None else param._unsharded_param.grad
                grads += grad.nbytes if grad is not None else 0
                params += param._unsharded_param.untyped_storage().nbytes()
    return grads, params


def _rank(rank: int, world: int, port: int, out: dict) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.set_num_threads(1)
    launch_config.register()
    cfg = launch_config.parse(compose(*RUN))
    strategy = build_strategy_and_model(cfg, cfg.model, DistEnv(rank=rank, world_size=world), torch.device("cpu"))
    held, reduce = {}, _PipelineStageBase.perform_reduce_grad

    def measured(stage, *args, **kwargs):
        held["grads"], held["gathered"] = unsharded(stage)
        return reduce(stage, *args, **kwargs)

    _PipelineStageBase.perform_reduce_grad = measured
    x = torch.randint(0, 64, (BATCH, 16))
    strategy.train_step([(x, x)], 1, 1e-3, 1.0)
    out[rank] = held["grads"], held["gathered"], sum(p.to_local().nbytes for p in strategy.model.parameters())
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_pipelines_fsdp_stage_is_estimated_with_its_gradients_and_parameters_held_whole_through_backward():
    got = spawn_ranks(_rank, 4)
    grads, gathered, sharded = max(got.values())  # the rank that holds the most (the first stage's)
    assert grads == 2 * sharded  # the stage's fp32 gradients unsharded: dp_shard=2 times its fp32 shard
    assert gathered == sharded  # its bf16 parameters gathered whole: half of fp32, twice the shard
    launch_config.register()
    cfg = launch_config.parse(compose(*RUN))
    dims = ParallelDims(pp=2, dp_shard=2)
    parts = estimate(cfg.model, cfg.train, cfg.strategy, dims, BATCH)
    assert parts.params == pytest.approx(sharded, rel=0.01)
    assert parts.grads == pytest.approx(grads, rel=0.01)  # it counted the shard: half of it
    assert traits_of("pipeline").gathers_whole(cfg.strategy, dims)
    counts = param_count(cfg.model)
    stage = rank_params(cfg.model, counts, cfg.strategy, dims)
    # gathered: the whole stage, where it counted one layer and the root's share
    assert gathered_bytes(cfg.model, counts, cfg.train, dims, 1 / 4, stage) == pytest.approx(gathered, rel=0.01)
