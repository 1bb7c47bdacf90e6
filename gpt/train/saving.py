"""Saving, as the training loop asks for it: at the policy's intervals (gpt.checkpoint.policy), a background save
committed once every rank has written its part, and the final save. A save that storage refuses stops the run, or
with checkpoint.on_save_error=continue is tried again at the next interval. What a checkpoint holds besides the
weights is gpt.train.state's; its format, atomicity and retention are the checkpointer's."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint.policy import SavePolicy
from gpt.checkpoint.save_errors import SaveFailed
from gpt.checkpoint.store import MODEL_ONLY
from gpt.checkpoint.writer import Checkpointer
from gpt.collectives.process_group import DistEnv, side_group
from gpt.config.schema import RunConfig
from gpt.parallel import strategy_class
from gpt.parallel.base import Strategy
from gpt.resilience.goodput import Spent
from gpt.resilience.progress import PROGRESS
from gpt.run_folder import RunFolder
from gpt.train.divergence import ROLLBACKS, DivergenceGuard
from gpt.train.state import TrainState

log = logging.getLogger(__name__)


def open_checkpointer(run: RunConfig, env: DistEnv, run_dir: Path, before_commit: Callable[[int], None],
                      after_commit: Callable[[int, Path], None] | None = None) -> Checkpointer:
    """The run folder's checkpointer. Built before the strategy, which waits for its background saves' staging
    copies before each update; those saves write on a gloo group of their own (side_group), where the strategy
    can save in the background at all."""
    ckpt = run.checkpoint
    background = ckpt.async_save and strategy_class(run.strategy.name).supports_async_save
    async_group = side_group("async_checkpoint") if background else None
    # process-wide: every torch.save of a rank writes into a checkpoint, whose manifest checks every file's size
    torch.serialization.set_crc32_options(ckpt.crc32)
    return Checkpointer(RunFolder(run_dir).checkpoints, ckpt.keep, env.is_main, env.rank, async_group=async_group,
                        async_save=ckpt.async_save, before_commit=before_commit,
                        after_commit=after_commit, threads=ckpt.thread_count, staging=ckpt.staging)


class Saver:
    def __init__(self, run: RunConfig, env: DistEnv, run_dir: Path, checkpointer: Checkpointer, strategy: Strategy,
                 state: TrainState, guard: DivergenceGuard, spent: Spent, warning_s: float | None = None):
        """`warning_s`: how long before the time limit the scheduler signals the job (cluster.signal_delay_s), which
        the policy checks a step and a save fit in."""
        self.ckpt, self.env, self.run_dir, self.checkpointer = run.checkpoint, env, run_dir, checkpointer
        self.max_steps = run.train.max_steps
        self.strategy, self.state, self.guard, self.spent = strategy, state, guard, spent
        self.policy = SavePolicy(self.ckpt, run_dir, spent, env.is_main, warning_s)
        self.saved_step: int | None = None  # the newest step saved (or resumed from)
        self.failed_saves: list[int] = []  # steps whose interval save storage refused (checkpoint.on_save_error)

    def save(self, step: int, eval_pending: bool, allow_async: bool = True) -> Path:
        self.guard.settle()  # a save after a divergence says so, or does not happen (divergence.policy=stop)
        PROGRESS.phase("save", f"checkpoint save at step {step}", step)
        with self.spent.timed("save_s"):
            path = self.checkpointer.save(step, self.strategy, self.meta(step, eval_pending),
                                          self.state.rank_state(step), allow_async=allow_async,
                                          last=step >= self.max_steps)
        self.spent.saves += 1
        self.policy.saved()
        self.saved_step = step
        if self.checkpointer.pending is None:
            log.info("saved checkpoint %s (training blocked %.2f s)", path, self.checkpointer.last_blocked_s)
        else:
            log.info("saving checkpoint %s in the background (training blocked %.2f s)", path,
                     self.checkpointer.last_blocked_s)
        return path

    def at_interval(self, step: int, eval_pending: bool) -> bool:
        """The policy's save after `step` steps, if one is due; whether it saved."""
        if not self.policy.save_now(step):
            return False
        if self.ckpt.final_model_only and step >= self.max_steps:  # the final save, the weights alone, comes next
            return False
        try:
            self.save(step, eval_pending)
        except SaveFailed as e:
            self.failed(step, e)
            return False
        return True

    def commit_written(self, step: int) -> None:
        """Every rank has written its part of the background save (the step's flags say so): commit it."""
        try:
            self.checkpointer.finish_async()
        except SaveFailed as e:
            self.failed(step, e)

    def final(self, step: int, eval_pending: bool, finished: bool = False) -> None:
        """The attempt's last save, synchronous, unless `step` is saved already; then every write done. Nothing
        trained yet (a signal before the first step): no checkpoint, the next attempt starts afresh as this one
        did. A step-0 checkpoint would not resume exactly: DCP gives an optimizer without state a step of its own,
        which shifts AdamW's bias correction. A `finished` run (at train.max_steps, no signal) under
        checkpoint.final_model_only saves its weights alone (DCP strategies; DeepSpeed's engine saves whole)."""
        if step > 0 and (self.saved_step != step or eval_pending):
            if finished and self.ckpt.final_model_only and self.strategy.supports_async_save:
                self.save_weights(step)
            else:
                self.save(step, eval_pending, allow_async=False)
        self.checkpointer.close()

    def save_weights(self, step: int) -> Path:
        """The final checkpoint of a finished run, the weights alone in checkpoint.final_dtype, marked so in its
        meta.json: resume passes over it for the newest that holds its optimizer state."""
        dtype = torch.bfloat16 if self.ckpt.final_dtype == "bf16" else torch.float32
        meta = {**self.meta(step, False), MODEL_ONLY: self.ckpt.final_dtype}
        PROGRESS.phase("save", f"the final weights at step {step}", step)
        with self.spent.timed("save_s"):
            path = self.checkpointer.save(step, self.strategy, meta, allow_async=False, weights_dtype=dtype)
        self.saved_step = step
        log.info("saved the final weights alone, %s, in %s (checkpoint.final_model_only; training blocked %.2f s)",
                 self.ckpt.final_dtype, path, self.checkpointer.last_blocked_s)
        return path

    def rolled_back(self, step: int) -> None:
        """Training goes on from the checkpoint of `step`: the next step is saved, so that the batches passed over
        are on disk from then on. The checkpoint of `step` on disk still holds the data position from before: a stop
        before the next step saves `step` again, with the new one (the batches would be replayed otherwise)."""
        self.saved_step = None
        self.policy.due = True

    def failed(self, step: int, e: SaveFailed) -> None:
        """An interval save that storage refused: stop (the rank exits with the line), or with
        checkpoint.on_save_error=continue train on and try again at the next interval."""
        if self.ckpt.on_save_error != "continue":
            raise e
        self.saved_step = None  # the final save is still due
        self.failed_saves.append(step)
        self.policy.failed()
        if self.env.is_main:
            RunFolder(self.run_dir).note_save_failure(step, str(e))
            log.warning("%s; checkpoint.on_save_error=continue: training goes on and the next save is tried at its "
                        "interval", e)

    def meta(self, step: int, eval_pending: bool) -> dict[str, Any]:
        """meta.json's fields for a checkpoint of `step`."""
        return {**self.state.meta(step, eval_pending), ROLLBACKS: self.guard.state()}
