"""The training loop that runs in every rank: it builds the model, strategy and data, resumes, and steps, evaluates
and saves until the last step or an agreed stop. Resuming (gpt.train.resume), what a checkpoint holds
(gpt.train.state), when to save (gpt.checkpoint.policy), why to stop early (gpt.train.stop) and what a step reports
(gpt.train.reporter) live in modules of their own."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint.policy import SavePolicy
from gpt.checkpoint.save_errors import SaveFailed
from gpt.checkpoint.writer import Checkpointer
from gpt.config.schema import RunConfig
from gpt.config.parse import to_plain
from gpt.data.loader import Prefetcher, TokenDataset, TrainBatches, ValBatches
from gpt.data.tokenizer import load_tokenizer
from gpt.collectives.flag_sum import BackgroundSum, sum_in_background
from gpt.collectives.process_group import DistEnv, pick_device, side_group
from gpt.eval.multiple_choice import TaskScorer
from gpt.parallel.base import StepResult, Strategy
from gpt.parallel.memory_estimate import MemoryParts
from gpt.parallel.memory_held import measure_step
from gpt.resilience.faults import Faults
from gpt.resilience.goodput import Spent
from gpt.resilience.progress import PROGRESS
from gpt.resilience.stragglers import StragglerMonitor
from gpt.run_folder import RunFolder
from gpt.train.build import build_strategy_and_model, model_config
from gpt.train.divergence import ROLLBACKS, DivergenceGuard, Rollback
from gpt.train.early_stop import Rungs
from gpt.train.metrics import MetricsWriter
from gpt.train.profiler import step_profiler
from gpt.train.schedule import lr_at
from gpt.train.reporter import ProgressBar, RunShape, StepReporter
from gpt.train.resume import Resume, continues_own
from gpt.train.rollback import roll_back
from gpt.train.state import TrainState
from gpt.train.step_timer import StepTimer, watch_compute_end
from gpt.train.stop import StopControl
from gpt.train.tracker import open_tracker

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, run: RunConfig, env: DistEnv, run_dir: Path, attempt: int = 1,
                 warning_s: float | None = None):
        """`warning_s`: how long before the time limit the scheduler signals the job (the launcher's
        cluster.signal_delay_s), which the save policy checks a step and a save fit in."""
        self.env, self.run_dir = env, run_dir
        self.train = run.train
        self.device = pick_device(self.train.device, env)
        data_dir = Path(run.data.dir)
        self.model_cfg = model_config(run.model, data_dir)

        self.startup: dict[str, float] = {}  # seconds per start-up phase, for the attempts log
        clock = time.perf_counter()
        PROGRESS.phase("startup", "building the model")
        own = continues_own(run.resume, RunFolder(run_dir).checkpoints)  # then init=hf: is not read again
        self.strategy = build_strategy_and_model(run, self.model_cfg, env, self.device, initialise=not own)
        self.startup["model_s"], clock = time.perf_counter() - clock, time.perf_counter()

        self.open_data(run, data_dir)
        self.startup["data_s"] = time.perf_counter() - clock

        stragglers = StragglerMonitor(env.world_size, config=run.stragglers, host=env.hostname)
        # test-only injections
        self.faults = Faults(run.debug, env.rank, attempt, self.device, run_dir)
        self.ckpt = run.checkpoint
        rungs = Rungs.of(run.launcher, self.train.eval_interval, run_dir)  # a sweep's early stopping
        self.stop = StopControl(run.preemption, rungs, env.is_main)
        self.flags_group = side_group("step_flags")  # the step's flags travel beside training
        self.flags: tuple[BackgroundSum, Any] | None = None  # cast at the last step, with the save they polled
        async_save = self.ckpt.async_save and self.strategy.supports_async_save
        async_group = side_group("async_checkpoint") if async_save else None
        self.checkpointer = Checkpointer(RunFolder(run_dir).checkpoints, self.ckpt.keep, env.is_main, env.rank,
                                         async_group=async_group, async_save=self.ckpt.async_save,
                                         before_commit=self.faults.before_commit)
        self.strategy.before_update = self.checkpointer.wait_staged
        self.guard = DivergenceGuard(run.divergence, self.checkpointer, env.is_main)
        self.state = TrainState(run.seed, run.data.dir, env, self.model_cfg, self.train, self.strategy, self.batches)
        self.step = self.first_step = 0
        self.saved_step: int | None = None
        self.failed_saves: list[int] = []  # steps whose interval save storage refused (checkpoint.on_save_error)
        self.eval_pending = False  # an evaluation a signal interrupted: the resumed run does it first
        self.spent = Spent()  # where this attempt's time goes (goodput)
        self.policy = SavePolicy(self.ckpt, run_dir, self.spent, env.is_main, warning_s)
        self.load_checkpoint(run)
        # from step 0 too: an attempt killed before its first checkpoint left records this one trains again
        tracker = open_tracker(run.tracking, run_dir, run.run_name, to_plain(run)) if env.is_main else None
        self.metrics = MetricsWriter(run_dir, env.rank, env.hostname, resume_step=self.step,
                                     keep_val_at_resume=not self.eval_pending, world_size=env.world_size,
                                     tracker=tracker)
        shape = RunShape(env, self.strategy, self.model_cfg, self.train, self.device, run_dir, self.micro_batch,
                         self.n_micro)
        self.reporter = StepReporter(shape, self.metrics, stragglers, self.spent, self.faults.slow_device)
        self.profiler = step_profiler(run.profile, env, attempt, run_dir, self.device)
        self.held: MemoryParts | None = None  # what the rank holds, measured in its first step
        # Gradients reduced over replicas after the backward's compute: a fast one's device waits there. Where the
        # waits are inside forward/backward, the reporter's compute probe judges them instead.
        if self.strategy.dp_size > 1 and not self.reporter.waits_in_compute:
            watch_compute_end(self.strategy.unwrapped, lambda: self.reporter.window)

    def open_data(self, run: RunConfig, data_dir: Path) -> None:
        """This rank's share of every batch (training, validation, downstream tasks), read ahead of the step."""
        self.micro_batch, self.n_micro = self.train.micro_batches(self.strategy.dp_size)
        block, dp_rank, dp_size = self.model_cfg.block_size, self.strategy.dp_rank, self.strategy.dp_size
        self.batches = TrainBatches(TokenDataset(data_dir, "train"), run.seed, block, self.train.global_batch_size,
                                    self.micro_batch, dp_rank, dp_size, self.device)
        self.val = ValBatches(TokenDataset(data_dir, "val"), run.seed, block, self.micro_batch * dp_size,
                              self.train.eval_batches, dp_rank, dp_size, self.device)
        self.prefetch = Prefetcher(self.batches)
        self.tasks = TaskScorer(run.eval.tasks, run.eval.limit, load_tokenizer(data_dir), block) if run.eval.tasks \
            else None

    def load_checkpoint(self, run: RunConfig) -> None:
        """The checkpoint this attempt starts from (resume=auto: the run's newest), if any."""
        clock = time.perf_counter()
        PROGRESS.phase("startup", "choosing and loading a checkpoint")
        self.resume = Resume(run.resume, self.checkpointer, self.state, self.faults, self.env)
        resumed = self.resume.load()
        self.startup["checkpoint_load_s"] = time.perf_counter() - clock
        self.resumed_from = resumed.path if resumed is not None else None
        if resumed is not None:
            self.step = self.first_step = self.saved_step = resumed.step
            self.eval_pending = resumed.eval_pending
            self.guard.resume(resumed.meta)

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float] | None:
        """The validation loss and the eval.tasks scores; None when a preemption signal interrupted them (the
        resumed run evaluates again)."""
        self.strategy.model.eval()
        loss = validation_loss(self.strategy, self.val, self.stop.signalled_anywhere)
        values = None if loss is None else {"loss": loss}
        if values is not None and self.tasks is not None:
            s = self.strategy
            scores = self.tasks.score(s.forward_loss, s.dp_rank, s.dp_size, s.dp_group, self.stop.signalled_anywhere,
                                      self.device)
            values = None if scores is None else {**values, **scores}
        self.strategy.model.train()
        self.eval_pending = values is None
        if values is not None:
            self.metrics.write(self.step, values, kind="val")
        return values

    def run_eval(self, summary: dict[str, Any], bar: ProgressBar) -> bool:
        PROGRESS.phase("eval", f"evaluation at step {self.step}", self.step)
        with self.spent.timed("eval_s"):
            values = self.evaluate()
        if values is None:
            return False
        summary.update(val_loss=values["loss"], **{k: v for k, v in values.items() if k.startswith("tasks/")})
        accuracies = "".join(f", {k.removeprefix('tasks/')} {v:.3f}" for k, v in values.items() if k.endswith("/acc"))
        bar.write(f"step {self.step}: val loss {values['loss']:.4f}{accuracies}")
        self.reporter.window.start = time.perf_counter()  # evaluation time is not training time
        return True

    # --- the loop -------------------------------------------------------------------------------------
    def sync(self) -> float:
        """The step's one small all-reduce: whether every rank's background checkpoint write is done, rank 0's
        verdict on checkpoint.interval_minutes, and the ranks' votes for the preemption signal they got. Cast at one
        step and acted on at the next, by every rank alike: it travels while the step computes, summed in log2(ranks)
        rounds (gpt.collectives.flag_sum; benchmarks/control_allreduce.py). Returns the
        seconds this rank still waited for it."""
        seconds = 0.0
        if self.flags is not None:
            (cast, polled), self.flags = self.flags, None
            seconds, (writing, due, *votes) = cast.wait()
            self.act_on_flags(writing == 0 and polled is not None and polled is self.checkpointer.pending,
                              bool(due), votes)
        if self.stop.reason is None:
            minutes_due = self.env.is_main and self.policy.minutes_elapsed()
            values = [0.0 if self.checkpointer.poll_done() else 1.0, 1.0 if minutes_due else 0.0, *self.stop.votes()]
            self.flags = sum_in_background(values, self.flags_group), self.checkpointer.pending
        return seconds

    def act_on_flags(self, written: bool, due: bool, votes: list[float]) -> None:
        """`written`: every rank's background write of the pending save is done."""
        if written:
            try:
                self.checkpointer.finish_async()
            except SaveFailed as e:
                self.save_failed(e)
        if any(votes):
            self.stop.agree(votes)
        if due:
            self.policy.due = True

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step; at log intervals also the metrics record of the window it closes."""
        t, window = self.train, self.reporter.window
        lr = lr_at(self.step, t)
        PROGRESS.phase("step", f"step {self.step}", self.step)
        self.faults.before_step(self.step)
        data_start = time.perf_counter()
        micro = self.prefetch.take(self.step)
        window.data_done(data_start, self.prefetch.read_s)
        window.sync_wait(self.sync())  # waiting for the others: communication time, not this rank's own work
        if self.stop.reason is not None:  # every rank stops before this step, and saves
            self.batches.step = self.step
            return None
        log_now = (self.step + 1) % t.log_interval == 0 or self.step == t.max_steps - 1
        self.faults.slow_device()  # test-only: a slow device lags inside the step, as a GPU's would
        # test-only: 1 unless debug.* says
        self.strategy.loss_factor = self.faults.loss_factor(self.batches.index(self.step))
        result = self.run_step(lambda: self.strategy.train_step(micro, self.n_micro, lr, t.grad_clip,
                                                                layer_norms=log_now and t.layer_grad_norms))
        window.step_done(result.clock)
        values = self.reporter.record(self.step, result, lr) if log_now else None
        self.guard.after_step(self.step, result.skipped)  # a skipped update: the step and its batches are spent
        self.step += 1  # trained: a rollback the guard raises below undoes it too
        if values is not None:  # the loss was read: the guard's tally is read with it
            self.guard.settle()
            self.guard.after_record(self.step - 1, values["loss"])
        return values

    def run_step(self, step: Callable[[], StepResult]) -> StepResult:
        """The strategy's step: what the rank holds measured at the attempt's first, traced where profile.* asks."""
        with self.profiler.around(self.step) if self.profiler else contextlib.nullcontext():
            if self.held is not None:
                return step()
            result, self.held = measure_step(self.strategy, self.n_micro, step)
        self.reporter.memory_held(self.step, self.held)
        return result

    def fit(self) -> dict[str, float]:
        t = self.train
        self.reporter.show_banner()
        bar = ProgressBar(t, self.step, self.env.is_main)
        summary: dict[str, Any] = {}
        self.reporter.window = StepTimer(self.device)
        if self.eval_pending and t.eval_interval:  # a signal interrupted it before the checkpoint: do it again
            self.run_eval(summary, bar)
        started = time.perf_counter()
        while self.step < t.max_steps and self.stop.reason is None:
            try:
                if not self.step_and_after(summary, bar, started):
                    break
            except Rollback as r:
                self.roll_back(r)
        try:  # what the steps since the last log step hold (a stop between them), before the final save
            self.guard.settle()
        except Rollback as r:
            self.roll_back(r)
        if self.flags is not None:  # the last step's: every rank cast it, so every rank waits for it
            self.flags[0].wait()
            self.flags = None
        bar.close()
        self.prefetch.close()
        PROGRESS.phase("finish", "the final save", self.step)
        self.stop.summarise(summary, self.step)
        # Nothing trained yet (a signal before the first step): no checkpoint, the next attempt starts afresh as
        # this one did. A step-0 checkpoint would not resume exactly: DCP gives an optimizer without state a
        # step of its own, which shifts AdamW's bias correction.
        if self.step > 0 and (self.saved_step != self.step or self.eval_pending):
            self.save(allow_async=False)
        self.checkpointer.close()
        summary["first_step"], summary["last_step"] = self.first_step, self.step
        summary["spent"] = self.spent.as_dict()
        if self.failed_saves:
            summary["failed_saves"] = self.failed_saves
        self.metrics.close()
        return summary

    def step_and_after(self, summary: dict[str, Any], bar: ProgressBar, started: float) -> bool:
        """One step, then what follows it (evaluation, a save); False: the loop ends."""
        t = self.train
        with self.spent.timed("train_s"):
            try:
                values = self.train_step()
            finally:  # a step a rollback undoes was trained all the same
                self.spent.steps += self.stop.reason is None
        if "first_step_s" not in self.startup:
            self.startup.update(first_step_s=time.perf_counter() - started, first_step_at=time.time())
        if self.stop.reason is not None:
            return False
        bar.advance(self.step, values)
        if values:
            summary.update(train_loss=values["loss"], tokens_per_s=values["tokens_per_s"])
        if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.max_steps):
            if not self.run_eval(summary, bar) or self.stop.after_eval(self.step, summary["val_loss"],
                                                                       last=self.step >= t.max_steps):
                return False
        if self.reporter.exclusion is not None:  # saved below, like a preemption; the worker requeues without it
            self.stop.exclude(self.reporter.exclusion)
        elif self.policy.save_now(self.step):
            try:
                self.save()
            except SaveFailed as e:
                self.save_failed(e)
        return True

    def roll_back(self, r: Rollback) -> None:
        """divergence.policy=rollback: training goes on from the restored checkpoint's step, past the batches that
        were trained since (gpt.train.rollback)."""
        # a load costs about what a save does: the watchdog gives it the synchronous save's budget
        PROGRESS.phase("finish", f"divergence.policy=rollback: loading the checkpoint from before step {r.step}",
                       self.step)
        done = roll_back(r, self.resume, self.guard.cfg.max_rollbacks)
        self.spent.steps_undone += self.step - done.step  # trained, then undone: goodput counts them lost
        self.step = self.saved_step = done.step
        self.policy.due = True  # the next step is saved: the batches passed over are on disk from then on
        self.metrics.rewind(done.step)  # the records of the steps undone go, as at a resume
        self.metrics.write(done.step, done.record(r.step, r.count), kind="rollback")
        self.reporter.window = StepTimer(self.device)  # the window's steps were undone

    def save(self, allow_async: bool = True) -> Path:
        self.guard.settle()  # a save after a divergence says so, or does not happen (divergence.policy=stop)
        PROGRESS.phase("save", f"checkpoint save at step {self.step}", self.step)
        with self.spent.timed("save_s"):
            path = self.checkpointer.save(self.step, self.strategy, self.checkpoint_meta(), self.rank_state(),
                                          allow_async=allow_async)
        self.spent.saves += 1
        self.policy.saved()
        self.saved_step = self.step
        if self.checkpointer.pending is None:
            log.info("saved checkpoint %s (training blocked %.2f s)", path, self.checkpointer.last_blocked_s)
        else:
            log.info("saving checkpoint %s in the background (training blocked %.2f s)", path,
                     self.checkpointer.last_blocked_s)
        self.reporter.window.start += self.checkpointer.last_blocked_s  # saving is not training time
        return path

    def save_failed(self, e: SaveFailed) -> None:
        """An interval save that storage refused: stop (the rank exits with the line), or with
        checkpoint.on_save_error=continue train on and try again at the next interval."""
        if self.ckpt.on_save_error != "continue":
            raise e
        self.saved_step = None  # the final save is still due
        self.failed_saves.append(self.step)
        self.policy.failed()
        if self.env.is_main:
            RunFolder(self.run_dir).note_save_failure(self.step, str(e))
            log.warning("%s; checkpoint.on_save_error=continue: training goes on and the next save is tried at its "
                        "interval", e)

    def checkpoint_meta(self) -> dict[str, Any]:
        """meta.json's fields for a checkpoint of the current step."""
        return {**self.state.meta(self.step, self.eval_pending), ROLLBACKS: self.guard.state()}

    def rank_state(self) -> dict[str, Any]:
        """This rank's own part of a checkpoint of the current step."""
        return self.state.rank_state(self.step)


def validation_loss(strategy: Strategy, batches: Iterable, interrupted: Callable[[], bool]) -> float | None:
    """The mean validation loss over the data-parallel replicas; None once a preemption signal interrupts it."""
    total, count = torch.zeros((), device=strategy.device), 0
    for x, y in batches:
        if interrupted():
            return None
        total += strategy.forward_loss(x, y)
        count += 1
    return strategy.mean_over_dp(total / max(count, 1)).item()
