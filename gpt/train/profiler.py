"""profile.*: torch.profiler traces of chosen steps on chosen ranks, and on GPUs CUDA's allocator history with a
memory snapshot when the rank runs out of memory (its path goes into the attempt's line), after the traced steps, and
when asked (python -m launch.memory_snapshot). Written into the run folder per attempt and rank (gpt.run_folder:
profiles/attempt-N/), so a requeued attempt never overwrites an earlier one's. With the section's defaults the
trainer builds none of this, and a step runs exactly as without it."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from gpt.config.profile import ProfileConfig
from gpt.collectives.process_group import DistEnv
from gpt.run_folder import RunFolder
from gpt.train.hooks import LoopHook
from gpt.train.out_of_memory import RanOutOfMemory

log = logging.getLogger(__name__)

HISTORY_ENTRIES = 100_000  # allocations and frees kept (several KB each): the last steps of a large model
# how often a rank keeping the history looks for a `python -m launch.memory_snapshot` request: a file read on shared
# storage, so not every step (thousands of ranks, steps of 100 ms)
LOOK_S = 5.0


class StepProfiler(LoopHook):
    """One rank's traces and memory snapshots: the loop's hook around each training step."""

    def __init__(self, cfg: ProfileConfig, env: DistEnv, attempt: int, run_dir: Path, device: torch.device):
        self.cfg, self.rank, self.attempt, self.device = cfg, env.rank, attempt, device
        self.folder = RunFolder(run_dir)
        self.steps = cfg.step_range() if cfg.traces(env.rank, env.local_rank, env.world_size) else None
        self.prof: profile | None = None
        self.history = cfg.memory_snapshot and device.type == "cuda"
        if self.history:
            torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES)
        self.answered = self.asked()  # a request made before this attempt started is not this attempt's
        self.looked = time.monotonic()

    @contextlib.contextmanager
    def around_step(self, step: int) -> Iterator[None]:
        if self.steps is not None and self.prof is None and self.steps[0] <= step <= self.steps[1]:
            self.start()
        try:
            with record_function(f"train step {step}") if self.prof else contextlib.nullcontext():
                yield
        except RanOutOfMemory as e:  # the trainer's, in place of torch's: the run goes on with a smaller micro-batch
            if self.history:
                e.record["snapshot"] = str(self.snapshot("oom"))
            raise
        if self.prof is not None and step >= self.steps[1]:
            self.finish()
        if self.history and time.monotonic() >= self.looked + LOOK_S:
            self.looked = time.monotonic()
            if (asked := self.asked()) != self.answered:
                self.answered = asked
                log.info("memory snapshot written on request: %s", self.snapshot(f"step{step}"))

    def asked(self) -> str | None:
        """The last request `python -m launch.memory_snapshot` made (a read of a few bytes)."""
        try:
            return self.folder.snapshot_request.read_text() if self.history else None
        except FileNotFoundError:
            return None

    def start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.prof = profile(activities=activities, record_shapes=self.cfg.record_shapes,
                            profile_memory=self.cfg.profile_memory)
        self.prof.start()

    def finish(self) -> None:
        """The trace written, then (profile.memory_snapshot) the allocator's history up to here: on demand."""
        self.prof.stop()
        path = self.folder.profile_trace(self.attempt, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(path))
        self.prof, self.steps = None, None  # once per attempt: a rollback that steps through again adds nothing
        log.info("profiler trace of steps %s written: %s", self.cfg.steps, path)
        if self.history:
            log.info("memory snapshot written: %s", self.snapshot("steps"))

    def snapshot(self, why: str) -> Path:
        path = self.folder.memory_snapshot(self.attempt, self.rank, why)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        return path


def step_profiler(cfg: ProfileConfig, env: DistEnv, attempt: int, run_dir: Path,
                  device: torch.device) -> StepProfiler | None:
    """The rank's profiler, or None when profile.* asks nothing of this rank (the default)."""
    if not cfg.traces(env.rank, env.local_rank, env.world_size) and not (cfg.memory_snapshot and
                                                                          device.type == "cuda"):
        return None
    return StepProfiler(cfg, env, attempt, run_dir, device)
