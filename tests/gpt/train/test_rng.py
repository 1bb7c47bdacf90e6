"""RNG streams on a CPU run: nothing touches CUDA (a CPU run on a GPU host opens no CUDA context on GPU 0), and
the CPU's dropout generator is seeded per stream as a GPU's is, one stream per tensor-parallel group."""
from __future__ import annotations

import random

import pytest
import torch

from gpt.train import rng

CPU = torch.device("cpu")


@pytest.fixture
def gpu_host(monkeypatch):
    """A host with GPUs whose every CUDA entry point fails the test: a CPU run must call none of them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all", "manual_seed",
                 "manual_seed_all", "seed", "seed_all", "current_device", "set_device", "init", "_lazy_init",
                 "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _name=name, **k: pytest.fail(f"torch.cuda.{_name} called"))


def test_cpu_run_on_a_gpu_host_saves_and_restores_rng_without_cuda(gpu_host):
    rng.seed_device(1337, 0, CPU)
    state = rng.capture(CPU)
    assert "cuda" not in state
    expected = (random.random(), torch.rand(3))
    rng.reseed(1337, 5, 0, CPU)  # a resume on another world size
    rng.restore(state, CPU)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def dropout_mask(stream: int) -> torch.Tensor:
    rng.seed_device(1337, stream, CPU)
    return torch.nn.functional.dropout(torch.ones(64), p=0.5) == 0


def test_cpu_dropout_streams_mirror_per_rank_gpu_seeds():
    tp = 2
    masks = [dropout_mask(rng.stream_index(rank, tp)) for rank in range(4)]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[2], masks[3])  # a tensor-parallel group
    assert not torch.equal(masks[0], masks[2])  # data-parallel replicas draw their own
    assert [rng.stream_index(rank, 1) for rank in range(3)] == [0, 1, 2]  # without tp: a stream per rank
