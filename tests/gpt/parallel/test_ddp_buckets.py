"""DDP's gradients are held once: every .grad is a view into the reducer's buckets (gradient_as_bucket_view), and
stays one across steps and gradient accumulation's micro-steps (zeroed in place, not freed: freed, the next backward
allocates new ones beside the buckets). The model's buffers (RoPE tables) are not broadcast before every forward."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import compose
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.train.build import build_strategy_and_model


def grads_in_buckets(strategy) -> dict[int, int]:
    """The storages every .grad lives in (data pointer: bytes); each .grad must be a view into one of them."""
    storages = {}
    for p in strategy.model.parameters():
        assert p.grad is not None and p.grad._base is not None, "a .grad of its own, beside DDP's buckets"
        storage = p.grad.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return storages


@pytest.mark.parametrize("strategy", ["ddp", "zero1"])
def test_gradients_are_views_into_the_buckets_through_accumulation(strategy):
    cfg = launch_config.parse(compose("model=tiny", "model.position=rope", f"strategy={strategy}",
                                      "train.device=cpu", "model.vocab_size=64", "strategy.bucket_cap_mb=0.05"))
    built = build_strategy_and_model(cfg, cfg.model, DistEnv(), torch.device("cpu"))
    try:
        assert not built.model.forward_sync_buffers and list(built.model.buffers())  # RoPE's tables
        x = torch.randint(0, 64, (2, 16))
        seen = []
        for _ in range(3):  # the reducer rebuilds its buckets once, in the second step's forward
            built.train_step([(x, x), (x, x)], 2, 1e-3, 1.0)
            seen.append(grads_in_buckets(built))
        params = sum(p.numel() * p.element_size() for p in built.model.parameters())
        buckets = [int(b) for b in str(built.model._get_ddp_logging_data()["rebuilt_bucket_sizes"]).split(",")]
        assert sorted(seen[-1].values()) == sorted(buckets) and len(buckets) > 1 and sum(buckets) == params
        assert seen[-1] == seen[-2]  # the same buckets: accumulated into, zeroed in place, never reallocated
    finally:
        dist.destroy_process_group()
