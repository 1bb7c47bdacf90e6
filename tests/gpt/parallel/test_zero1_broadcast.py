"""ZeRO-1 hands the updated parameters to every rank in one all-gather after a step: not one broadcast per
parameter (what ZeroRedundancyOptimizer does by default: about 150 calls a step for gpt2_124m, each paying
latency), nor one per rank (what it does with parameters_as_bucket_view: W calls a step on every rank), and the
parameters come out bitwise as torch's broadcasts leave them."""
from __future__ import annotations

import datetime
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from helpers import compose, spawn_ranks
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.parallel.zero1 import GatheringZero
from gpt.train.build import build_strategy_and_model


def test_one_all_gather_after_a_step(monkeypatch):
    cfg = launch_config.parse(compose("model=tiny", "strategy=zero1", "train.device=cpu", "model.vocab_size=64"))
    strategy = build_strategy_and_model(cfg, cfg.model, DistEnv(), torch.device("cpu"))
    try:
        calls = []
        for name in ("broadcast", "all_gather_into_tensor", "all_gather_single"):
            real = getattr(dist, name)
            monkeypatch.setattr(dist, name, lambda tensor, *a, _name=name, _real=real, **k:
                                calls.append((_name, tensor.numel())) or _real(tensor, *a, **k))
        x = torch.randint(0, 64, (2, 16))
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # torch's deprecated names print in every rank's log
            strategy.train_step([(x, x)], 1, 1e-3, 1.0)
        params = sum(p.numel() for p in strategy.model.parameters())
        assert calls == [("all_gather_single", params)]  # one rank here: its one slice, every parameter in it
    finally:
        dist.destroy_process_group()


def _model() -> nn.Module:
    """Parameters of uneven sizes, so that the ranks' partitions differ in length and the slices are padded; one
    frozen, which keeps storage of its own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.Linear(13, 3), nn.Linear(3, 5, bias=False))
    model[1].bias.requires_grad_(False)
    return model


def _steps(optimizer_class, rank: int) -> list[torch.Tensor]:
    model = _model()
    optimizer = optimizer_class(model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.1,
                                parameters_as_bucket_view=True)
    for step in range(3):
        torch.manual_seed(100 * step + rank)  # each rank's own gradients, as each reduces its own batch here
        model(torch.randn(4, 7)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _rank(rank: int, world: int, port: int, out: dict) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.set_num_threads(1)
    broadcast, gathered = _steps(ZeroRedundancyOptimizer, rank), _steps(GatheringZero, rank)
    out[rank] = all(torch.equal(a, b) for a, b in zip(broadcast, gathered, strict=True))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_all_gather_leaves_the_parameters_bitwise_as_the_broadcasts_do():
    world = 3
    assert spawn_ranks(_rank, world) == {r: True for r in range(world)}
