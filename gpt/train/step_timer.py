"""The one timing source for a step's parts: data, forward/backward, optimizer, communication wait and compute.

Marks are stamps: on a GPU CUDA events recorded on the current stream (`EventStamp`), on a CPU the wall clock
(`WallStamp`). Events are only read when a log window closes (`StepTimer.read`), so timing every step costs no host
synchronisation. CUDA refuses the time between two events until both completed: `PhaseClock.seconds` waits for its
newest mark itself (the earlier ones are on the same stream, so complete with it).

Where a rank waits for the others:
- on the host, for the step's flags (`StepTimer.sync_wait`): about 0, as they are agreed a step after they are
  cast and travel meanwhile, unless a peer lags by more than a step;
- on the device, for the gradient reduction over data-parallel replicas: from the end of the backward's compute
  (the gradient reaching the embedding's output, `mark_compute_end`) to the end of forward/backward. DDP and ZeRO
  reduce in the background while backward computes, so a fast rank's device waits there for a slow rank's last
  gradients. (The embedding's own weight gradient falls in this span too: a few element-wise passes.)

comm_s is the sum of both, and compute_s = step time - comm_s: the time a rank spends on its own work. On a GPU
collectives equalise the step times of all ranks, so stragglers, exclusion and the report judge ranks on compute_s.

Under FSDP, HSDP, tensor parallel, pipeline and ZeRO-3 (the strategy's trait `waits_in_compute`) a rank also waits
inside forward and backward: parameter all-gathers, activation all-reduces, a stage's receives. There the wait is
interleaved with compute, layer by layer, on streams of the collectives' own, and no mark of this timer separates
it; the backward's end mark is not used. Timing every collective instead (NCCL's TORCH_NCCL_ENABLE_TIMING) would
give each collective's span, transfer and overlap with compute included, and only for NCCL, with FSDP's and
tensor parallel's collectives issued inside torch. So each rank times the same small, local, collective-free work
once per log window with this clock (gpt.train.compute_probe; 0.7% of a window for model=tiny on a CPU:
`python -m benchmarks.probe_cost`): the ratio of its probe to the slowest rank's says which share of its
forward/backward was a wait, which moves from compute_s to comm_s. It finds a slow device; the bubble of a balanced
pipeline and collectives' transfer time stay in compute_s.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


class Stamp(Protocol):
    def seconds_to(self, later: Stamp) -> float: ...

    def wait(self) -> None: ...


class WallStamp:
    """The host's wall clock now."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def seconds_to(self, later: WallStamp) -> float:
        return later.t - self.t

    def wait(self) -> None:
        pass


class EventStamp:
    """A CUDA event recorded on the current stream: when the device gets there, not when the host does."""

    def __init__(self) -> None:
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def seconds_to(self, later: EventStamp) -> float:
        return self.event.elapsed_time(later.event) / 1e3

    def wait(self) -> None:
        self.event.synchronize()


def stamp_for(device: torch.device) -> type[WallStamp] | type[EventStamp]:
    return EventStamp if device.type == "cuda" else WallStamp


class PhaseClock:
    """One step's phases, marked by the strategy: `mark("fwd_bwd")` when forward/backward ends."""

    def __init__(self, device: torch.device):
        self.stamp = stamp_for(device)
        self.marks: list[tuple[str, Stamp]] = [("start", self.stamp())]

    def mark(self, phase: str) -> None:
        """The phase named `phase` ends now."""
        self.marks.append((phase, self.stamp()))

    def end_of(self, phase: str) -> Stamp | None:
        return next((s for p, s in self.marks if p == phase), None)

    def seconds(self) -> dict[str, float]:
        """{"<phase>_s": seconds} for every phase marked, once the device got to the newest mark."""
        self.marks[-1][1].wait()
        return {f"{phase}_s": begin.seconds_to(end) for (_, begin), (phase, end) in zip(self.marks, self.marks[1:])}


@dataclass
class StepMarks:
    clock: PhaseClock | None
    compute_end: Stamp | None  # the backward's last compute before the gradient reduction is awaited


@dataclass
class StepTimer:
    """Time and steps since the last metrics record, and each step's marks until the record reads them."""

    device: torch.device
    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    data_s: float = 0.0  # the training thread waiting for its batch
    data_read_s: float = 0.0  # the loader reading it (on the prefetch thread, mostly hidden behind compute)
    sync_s: float = 0.0  # waiting for the other ranks at the step's flags all-reduce (host)
    marks: list[StepMarks] = field(default_factory=list)
    compute_end: Stamp | None = None  # this step's, until step_done

    def data_done(self, since: float, read_s: float = 0.0) -> None:
        self.data_s += time.perf_counter() - since
        self.data_read_s += read_s

    def sync_wait(self, seconds: float) -> None:
        self.sync_s += seconds

    def mark_compute_end(self) -> None:
        self.compute_end = stamp_for(self.device)()

    def step_done(self, clock: PhaseClock | None) -> None:
        self.marks.append(StepMarks(clock, self.compute_end))
        self.compute_end = None
        self.steps += 1

    def read(self, window_s: float) -> dict[str, float]:
        """Means per step over the window of `window_s` seconds (wall, after the device finished its work)."""
        phases: dict[str, float] = {}
        grad_wait = 0.0
        for m in self.marks:
            for key, seconds in (m.clock.seconds() if m.clock else {}).items():
                phases[key] = phases.get(key, 0.0) + seconds
            end = m.clock.end_of("fwd_bwd") if m.clock else None
            if m.compute_end is not None and end is not None:  # end completed with its clock's newest mark
                grad_wait += max(m.compute_end.seconds_to(end), 0.0)
        n = self.steps
        step_s, comm_s = window_s / n, (self.sync_s + grad_wait) / n
        return {"step_time_s": step_s, "data_time_s": self.data_s / n,
                "data_read_s": self.data_read_s / n, "comm_s": comm_s,
                "compute_s": max(step_s - comm_s, 0.0), **{k: v / n for k, v in phases.items()}}


def watch_compute_end(model: nn.Module, timer_of: Any) -> None:
    """Mark the end of the backward's compute on `timer_of()`'s timer: when the gradient reaches the output of the
    token embedding, every layer's backward is done, and what follows is the wait for the gradient reduction. A
    model without the embedding (a later pipeline stage) marks nothing; layouts that wait inside forward/backward
    are judged by the compute probe instead."""
    embedding = getattr(model, "wte", None)
    if embedding is None:
        return

    def on_output(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda grad: timer_of().mark_compute_end())

    embedding.register_forward_hook(on_output)
