"""The compute probe: where peers wait inside forward and backward (FSDP, tensor parallel, pipeline, ZeRO-3), every
rank's time for the same local work tells the slow device, and its peers' wait moves from compute_s to comm_s.

Real multi-process runs of those layouts are in tests/launch/test_straggler_run.py; here the pure judgement, the
GPU path on the strict CUDA stand-in, and which layouts need the probe."""
from __future__ import annotations

import math

import pytest
import torch

from gpt.config.model import ModelConfig
from gpt.config.sections import DebugConfig, StragglerConfig
from gpt.config.strategy import StrategyConfig
from gpt.parallel.layout import ParallelDims
from gpt.parallel.traits import traits_of
from gpt.resilience.faults import Faults
from gpt.resilience.stragglers import StragglerDetector
from gpt.train.compute_probe import REPEATS, ComputeProbe, probe_waits


def hidden_layout(probe: list[float]) -> list[dict]:
    """A GPU window under FSDP: no host wait, equal step and forward/backward times (the fast ranks waited for
    rank 2 inside its all-gathers, which the step timer counts as their compute)."""
    return [{"step_time_s": 0.8, "fwd_bwd_s": 0.7, "comm_s": 0.0, "compute_s": 0.8, "probe_s": p, "host": f"n{r}"}
            for r, p in enumerate(probe)]


def test_the_step_timer_alone_misses_a_slow_rank_whose_peers_wait_inside_forward_and_backward():
    figures = hidden_layout([1e-3, 1e-3, 1.6e-3])
    assert StragglerDetector(3, StragglerConfig(windows=1)).observe(1, figures).lagging == []  # today's figures
    judged = probe_waits(figures)
    assert judged[2]["comm_s"] == 0.0 and judged[2]["compute_s"] == pytest.approx(0.8)
    fast = judged[0]  # its own compute: the slow rank's forward/backward at its faster device's pace
    assert fast["hidden_wait_s"] == pytest.approx(0.7 * (1 - 1 / 1.6))
    assert fast["compute_s"] == pytest.approx(0.8 - fast["hidden_wait_s"]) and fast["comm_s"] == fast["hidden_wait_s"]
    summary = StragglerDetector(3, StragglerConfig(windows=1)).observe(1, judged)
    assert summary.lagging == [2] and summary.ranks[2].busy_s == pytest.approx(0.8)


def test_equal_devices_wait_for_no_one_and_missing_probes_change_nothing():
    judged = probe_waits(hidden_layout([1e-3, 1e-3, 1e-3]))
    assert all(f["hidden_wait_s"] == 0.0 and f["compute_s"] == 0.8 for f in judged)
    partial = hidden_layout([1e-3, None, 1e-3])  # a rank that measured none: no judgement this window
    assert probe_waits(partial) == partial
    assert probe_waits(hidden_layout([0.0, 0.0, 0.0]))[0]["compute_s"] == 0.8


def test_the_gpu_path_times_the_probe_on_the_device_and_a_slow_device_is_slow_on_it(strict_cuda):
    model = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    faults = Faults(DebugConfig(delay_rank=0, delay_s=0.5), 0, device=torch.device("cuda", 0))
    probe = ComputeProbe(model, tokens=64, device=torch.device("cpu"), precision="bf16", step_flops=4 * 2 * 64 * 16 * 64,
                         slow=faults.slow_device)
    assert probe.share == pytest.approx(0.25)  # its work is a quarter of a step's
    probe.work = lambda: strict_cuda.run(2e-3)  # the matmul's device time on the stand-in's clock
    waits = strict_cuda.host_waits
    assert probe.seconds() == pytest.approx(2e-3 + 0.25 * 0.5)  # the device's time, read once it got there
    assert strict_cuda.host_waits - waits == REPEATS  # one wait per run: its end event, as CUDA requires
    healthy = ComputeProbe(model, 64, torch.device("cpu"), "fp32", 1.0)
    healthy.work = lambda: strict_cuda.run(2e-3)
    assert healthy.seconds() == pytest.approx(2e-3)


def test_the_probe_works_on_the_cpu_and_is_capped_on_large_models():
    probe = ComputeProbe(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=32), 10**6,
                         torch.device("cpu"), "bf16", 1e12)
    assert probe.x.shape == (8192, 32) and probe.x.dtype == torch.float32  # CPUs run it in fp32
    assert 0 < probe.seconds() < math.inf


@pytest.mark.parametrize("name, options, dims, expected", [
    ("ddp", {}, ParallelDims(dp_replicate=4), False),  # waits after the backward's compute: the step timer's
    ("zero1", {}, ParallelDims(dp_shard=4), False),
    ("deepspeed", {"stage": 2}, ParallelDims(dp_shard=4), False),
    ("deepspeed", {"stage": 3}, ParallelDims(dp_shard=4), True),
    ("fsdp", {}, ParallelDims(dp_shard=4), True),
    ("fsdp", {}, ParallelDims(dp_replicate=2, dp_shard=2), True),
    ("fsdp", {}, ParallelDims(tp=2), True),
    ("fsdp", {}, ParallelDims(), False),
    ("pipeline", {}, ParallelDims(pp=2), True),
])
def test_the_layouts_whose_peers_wait_inside_forward_and_backward(name, options, dims, expected):
    assert traits_of(name).waits_in_compute(StrategyConfig(name=name, **options), dims) is expected
