"""ZeRO-1 sends the updated parameters one bucket per rank after a step, not one broadcast per parameter (what
ZeroRedundancyOptimizer does by default: about 150 calls a step for gpt2_124m, each paying latency)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from helpers import compose
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.train.build import build_strategy_and_model


def test_one_broadcast_per_rank_after_a_step(monkeypatch):
    cfg = launch_config.parse(compose("model=tiny", "strategy=zero1", "train.device=cpu", "model.vocab_size=64"))
    strategy = build_strategy_and_model(cfg, cfg.model, DistEnv(), torch.device("cpu"))
    try:
        sent = []
        broadcast = dist.broadcast
        monkeypatch.setattr(dist, "broadcast", lambda tensor, *a, **k: sent.append(tensor.numel())
                            or broadcast(tensor, *a, **k))
        x = torch.randint(0, 64, (2, 16))
        strategy.train_step([(x, x)], 1, 1e-3, 1.0)
        params = sum(p.numel() for p in strategy.model.parameters())
        assert sent == [params]  # one rank here: its one bucket, every parameter in it
    finally:
        dist.destroy_process_group()
