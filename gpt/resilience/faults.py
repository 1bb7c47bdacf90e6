"""Fault injection (`debug.*`), for tests and demonstrations only: the README marks it so. Every injection lives
here, behind hooks the trainer and the checkpointer call at fixed points; with the defaults each hook does
nothing, so a normal run is never changed.

    debug.delay_rank, delay_s           a rank lags every step (a straggler), inside the step's work: on a GPU
                                        its device computes delay_s longer (the host runs on), on a CPU its
                                        training thread sleeps; the compute probe lags in proportion
    debug.save_sleep_s, save_sleep_step a save stalls before it is committed (to kill a run mid-write)
    debug.signal_at_step, signal_rank,  a rank sends itself a signal so that the run stops before those steps
      signal_name
    debug.unreadable_rank               that rank cannot read the newest checkpoint (resume must agree)
    debug.hang_rank, hang_step          a rank hangs at that step, or before it joins the others (the watchdog)
    debug.hang_every_attempt            ...in every attempt, not only the first (a deterministic hang)
    debug.kill_rank, kill_step          a rank kills itself (SIGKILL) at that step (a dead rank)
    debug.abort_on_collective_error     a rank whose collective fails aborts (SIGABRT), as NCCL's async error
                                        handling ends the survivors of a lost or failed peer (a CPU mirror)
    debug.straggler_rank, straggler_s   a rank lags every step of the first attempt (a sick host: excluded,
                                        the next attempt runs without it)
    debug.nan_at_step, nan_rank         that rank's loss is NaN on that step's batch (a divergence:
                                        gpt.train.divergence; a rollback passes over the batch)
    debug.spike_at_step, spike_factor   spike_rank's loss (every rank's, by default) is multiplied by spike_factor
      spike_rank                        on that step's batch
    debug.fill_disk_step                rank 0 fills the file system of the run folder before that step (with
                                        RUN_DIR/../.debug-fill-disk, outside the run folder): a full disk between
                                        saves, or during an asynchronous save still in flight

A hang or a kill happens only in the run's first attempt (the resumed attempt must be able to finish), unless
debug.hang_every_attempt says otherwise.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from gpt.resilience.progress import PROGRESS
from gpt.config.sections import DebugConfig
from gpt.train.hooks import LoopHook

log = logging.getLogger(__name__)


class Faults(LoopHook):
    """The loop's hook at the top of every step and inside it (before_step, around_step), and the hooks the
    checkpointer, resuming and the compute probe call."""

    def __init__(self, cfg: DebugConfig, rank: int, attempt: int = 1, device: torch.device = torch.device("cpu"),
                 run_dir: Path | None = None):
        self.cfg, self.rank, self.first_attempt, self.device, self.run_dir = cfg, rank, attempt == 1, device, run_dir
        self.hangs = cfg.hang_rank == rank and (self.first_attempt or cfg.hang_every_attempt)

    def before_start(self) -> None:
        """Before the rank joins the others: debug.hang_rank with no hang_step hangs here."""
        c = self.cfg
        if self.hangs and c.hang_step is None:
            self._hang("before joining the other ranks")

    def before_step(self, step: int) -> None:
        """At the top of every step."""
        c = self.cfg
        # A step ahead: the ranks agree on a signal at the step after it comes, so the run stops before step S
        # (never at the step an attempt resumed from, S - 1 < first_step: it would stop again at once, for ever).
        if step + 1 in c.signal_steps and self.rank == c.signal_rank:
            os.kill(os.getpid(), getattr(signal, c.signal_name))
        if self.first_attempt and c.kill_rank == self.rank and step == c.kill_step:
            log.warning("debug.kill_rank: rank %d kills itself at step %d", self.rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hangs and step == c.hang_step:
            self._hang(f"at step {step}")
        if self.first_attempt and self.rank == 0 and step == c.fill_disk_step and self.run_dir is not None:
            fill_disk(self.run_dir.parent / ".debug-fill-disk")

    @contextlib.contextmanager
    def around_step(self, step: int) -> Iterator[None]:
        """The strategy's step, on a slow device (slow_device) as the first thing inside it."""
        self.slow_device()
        yield

    def slow_device(self, share: float = 1.0) -> float:
        """debug.delay_rank / straggler_rank: this rank's device is slow, by delay_s per step of work. The loop
        calls it inside the step (around_step), after the host's flags all-reduce (share 1): a GPU's device lags
        there too, so its peers wait for it inside the step's collectives (the gradient reduction, FSDP's
        all-gathers, tensor parallel's all-reduces, the pipeline's receives), not in that all-reduce. The compute
        probe calls it with its work's share of a step's, so a slow device is as slow on it. Returns the lag in
        seconds."""
        c = self.cfg
        if c.delay_rank == self.rank and c.delay_s > 0:
            return self._lag(c.delay_s * share)
        if self.first_attempt and c.straggler_rank == self.rank and c.straggler_s > 0:
            return self._lag(c.straggler_s * share)
        return 0.0

    def _lag(self, seconds: float) -> float:
        """A slow device: on a GPU a kernel that spins for `seconds` on the compute stream, so the rank's device
        computes longer while its host runs on, and its peers' devices wait for it inside the collectives; on a
        CPU, where the training thread is the device, it sleeps."""
        if self.device.type == "cuda":
            khz = torch.cuda.get_device_properties(self.device).clock_rate
            torch.cuda._sleep(int(seconds * khz * 1e3))
        else:
            time.sleep(seconds)
        return seconds

    def _hang(self, where: str) -> None:
        log.warning("debug.hang_rank: rank %d hangs %s", self.rank, where)
        PROGRESS.what = f"debug.hang_rank: hanging {where}"
        threading.Event().wait()  # for ever; the GIL is free, so the watchdog thread runs

    def loss_factor(self, batch: int) -> float:
        """What this rank's loss is multiplied by on the batch of index `batch` (a step's own, unless a rollback
        passed over batches: then the batch it names is never trained again): NaN on the batch of debug.nan_at_step
        (on nan_rank), spike_factor on that of debug.spike_at_step (on spike_rank, or every rank), else 1."""
        c = self.cfg
        if batch == c.nan_at_step and self.rank == c.nan_rank:
            return float("nan")
        return c.spike_factor if batch == c.spike_at_step and c.spike_rank in (None, self.rank) else 1.0

    def before_commit(self, step: int) -> None:
        """Inside a save, after the shards and before meta.json."""
        c = self.cfg
        if c.save_sleep_s > 0 and c.save_sleep_step in (None, step):
            log.info("debug: sleeping %.1f s inside the save of step %d", c.save_sleep_s, step)
            time.sleep(c.save_sleep_s)

    def unreadable(self, newest: bool) -> str | None:
        """Why this rank cannot read a checkpoint, when a test says it cannot see the newest."""
        if newest and self.cfg.unreadable_rank == self.rank:
            return f"rank {self.rank} cannot read it (debug.unreadable_rank)"
        return None


def fill_disk(ballast: Path) -> None:
    """Write `ballast` until its file system refuses another byte."""
    log.warning("debug.fill_disk_step: filling the disk with %s", ballast)
    with open(ballast, "ab", buffering=0) as f:
        for chunk in (2**20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


def abort_like_nccl(cfg: DebugConfig) -> None:
    """debug.abort_on_collective_error, after a collective failed here: end as NCCL's watchdog ends a survivor
    (TORCH_NCCL_ASYNC_ERROR_HANDLING at its default), by SIGABRT, before Python reports anything."""
    if cfg.abort_on_collective_error:
        log.warning("debug.abort_on_collective_error: a collective failed; aborting")
        logging.shutdown()
        os.abort()
