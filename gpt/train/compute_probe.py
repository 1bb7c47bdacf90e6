"""The compute probe: a fixed, local, collective-free piece of device work, timed once per log window with the
step's clock (gpt.train.step_timer), and how it tells a slow rank where the step timer cannot.

Under FSDP, HSDP, tensor parallel, pipeline and ZeRO-3 the collectives run inside forward and backward (parameter
all-gathers, activation all-reduces, stage sends and receives): a slow rank delays its peers there, and the step
timer counts their wait as their compute. Every rank does the same probe work, so its time compares the devices
alone, whatever the layout and whatever each rank's share of the model (a pipeline stage, a tensor-parallel
slice). The probe is the MLP's first matmul at the model's width, on up to a micro-batch of tokens (capped:
`MAX_TOKENS`), in the training dtype on a GPU; the fastest of `REPEATS` runs, so a one-off interruption does not
count.

`probe_waits` turns every rank's figures of one window into what each rank waited inside forward and backward: the
rank with the slowest probe waits for no one, and a rank whose probe is faster spends that share of its
forward/backward waiting, `fwd_bwd_s * (1 - probe_s / slowest probe_s)`. That wait joins comm_s and leaves compute_s,
so stragglers, exclusion, the report's comm_fraction and the performance model all read it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from gpt.config.model import ModelConfig
from gpt.train.step_timer import PhaseClock

REPEATS = 3
MAX_TOKENS = 8192  # enough rows to fill a GPU at a model's width; bounds the probe's memory on large models
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ComputeProbe:
    """`seconds()`: this rank's time for the probe work. `slow(share)` is the test-only slow device
    (gpt.resilience.faults), told the probe's share of a step's work on this rank (`step_flops`)."""

    def __init__(self, model: ModelConfig, tokens: int, device: torch.device, precision: str, step_flops: float,
                 slow: Callable[[float], float] = lambda share: 0.0):
        dtype = DTYPES.get(precision, torch.float32) if device.type == "cuda" else torch.float32
        tokens, width = min(tokens, MAX_TOKENS), model.n_embd
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(tokens, width, generator=generator).to(device, dtype)
        self.w = (torch.randn(width, 4 * width, generator=generator) / math.sqrt(width)).to(device, dtype)
        self.flops = 2.0 * tokens * width * 4 * width
        self.share = self.flops / step_flops if step_flops > 0 else 0.0
        self.device, self.slow = device, slow

    def work(self) -> None:
        torch.matmul(self.x, self.w)

    def seconds(self) -> float:
        best = math.inf
        for _ in range(REPEATS):
            clock = PhaseClock(self.device)
            self.work()
            self.slow(self.share)
            clock.mark("probe")
            best = min(best, clock.seconds()["probe_s"])  # waits for the device to finish the probe
        return best


def _finite(value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def probe_waits(figures: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's figures with the wait inside forward/backward moved from compute_s to comm_s (`hidden_wait_s`
    says how much), judged by the probe; figures without probes on every rank come back as they were."""
    probes = [_finite(f.get("probe_s")) for f in figures]
    slowest = max(probes, default=math.nan)
    if any(math.isnan(p) for p in probes) or not slowest > 0:
        return [dict(f) for f in figures]
    out = []
    for f, probe in zip(figures, probes):
        step, comm, fwd_bwd = (_finite(f.get(k)) for k in ("step_time_s", "comm_s", "fwd_bwd_s"))
        if math.isnan(step) or math.isnan(fwd_bwd):
            out.append(dict(f))
            continue
        hidden = fwd_bwd * (1.0 - probe / slowest)
        comm = (0.0 if math.isnan(comm) else comm) + hidden
        out.append({**f, "hidden_wait_s": hidden, "comm_s": comm, "compute_s": max(step - comm, 0.0)})
    return out
