"""The training loop that runs in every rank: it builds the model, strategy and data, resumes, and steps until the
last step or an agreed stop. What it works with lives in modules of their own: resuming (gpt.train.resume), what a
checkpoint holds (gpt.train.state), saving (gpt.train.saving), evaluation (gpt.train.evaluation), the step's flags
(gpt.train.step_flags), why to stop early (gpt.train.stop), what a step reports (gpt.train.reporter) and what the loop
returns (gpt.train.summary). A feature that needs the loop reaches it through a hook (gpt.train.hooks)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gpt.collectives.process_group import DistEnv, pick_device
from gpt.config.schema import RunConfig
from gpt.resilience.faults import Faults
from gpt.resilience.goodput import Spent
from gpt.resilience.progress import PROGRESS
from gpt.train.build import build_strategy_and_model, model_config, open_data
from gpt.train.divergence import DivergenceGuard, Rollback
from gpt.train.evaluation import Evaluator
from gpt.train.hooks import Hooks, LoopHook
from gpt.train.metrics import open_metrics
from gpt.train.out_of_memory import OutOfMemoryHook
from gpt.train.profiler import step_profiler
from gpt.train.reporter import ProgressBar, RunShape, StepReporter
from gpt.train.resume import Resume, continues_own
from gpt.train.rollback import roll_back
from gpt.train.saving import Saver, open_checkpointer
from gpt.train.schedule import lr_at
from gpt.train.step_flags import StepFlags
from gpt.train.stop import StopControl
from gpt.train.summary import FitSummary


class Trainer:
    def __init__(self, run: RunConfig, env: DistEnv, run_dir: Path, attempt: int = 1,
                 warning_s: float | None = None, hooks: Sequence[LoopHook] = (),
                 cannot_spare: Callable[[str], str] = lambda host: ""):
        """`warning_s`: how long before the time limit the scheduler signals the job (the launcher's
        cluster.signal_delay_s), which the save policy checks a step and a save fit in. `hooks`: the caller's
        features that need the loop, called after the loop's own. `cannot_spare`: why the scheduler could not run
        the job without a host ('' when it could), asked before a straggler's host is excluded."""
        self.env, self.run_dir, self.train = env, run_dir, run.train
        self.device = pick_device(self.train.device, env, run.debug.share_gpu)
        self.model_cfg = model_config(run.model, Path(run.data.dir))
        self.faults = Faults(run.debug, env.rank, attempt, self.device, run_dir)  # test-only injections
        # before the strategy, which waits for a background save's staging copy before each update; the hooks (built
        # below, before the first save) hear of each committed one
        checkpointer = open_checkpointer(run, env, run_dir, self.faults.before_commit,
                                         lambda step, path: self.hooks.saved(step, path))

        self.startup: dict[str, float] = {}  # seconds per start-up phase, for the attempts log
        clock = time.perf_counter()
        PROGRESS.phase("startup", "building the model")
        own = continues_own(run.resume, checkpointer.root)  # then init=hf: is not read again
        self.strategy = build_strategy_and_model(run, self.model_cfg, env, self.device, initialise=not own,
                                                 before_update=checkpointer.wait_staged, phases=self.startup)
        self.startup["model_s"], clock = time.perf_counter() - clock, time.perf_counter()
        self.data = open_data(run, self.model_cfg, self.strategy, self.device)
        self.startup["data_s"] = time.perf_counter() - clock

        self.stop = StopControl.of(run, run_dir, env.is_main)
        self.guard = DivergenceGuard(run.divergence, checkpointer, env.is_main)
        self.resume = Resume(run, env, checkpointer, self.faults, self.model_cfg, self.strategy, self.data.batches)
        self.spent = Spent()  # where this attempt's time goes (goodput)
        self.saver = Saver(run, env, run_dir, checkpointer, self.strategy, self.resume.state, self.guard, self.spent,
                           warning_s)
        self.flags = StepFlags(self.saver, self.stop, env.is_main)
        eval_pending = self.load_checkpoint()
        self.metrics = open_metrics(run, env, run_dir, self.step, keep_val_at_resume=not eval_pending)
        shape = RunShape(env, self.strategy, self.model_cfg, self.train, self.device, run_dir, self.data.micro_batch,
                         self.data.n_micro)
        self.reporter = StepReporter(shape, self.metrics, run.stragglers, self.spent, self.faults.slow_device,
                                     cannot_spare)
        self.evaluator = Evaluator(self.train, self.strategy, self.data.val, self.data.tasks, self.stop, self.metrics,
                                   self.spent, eval_pending)
        # In this order around the step: a slow device's lag (test-only) before the profiler starts, and the
        # profiler outside the first step's measurement, which measures the step's memory alone.
        shape = (self.data.micro_batch, self.data.n_micro, self.train.global_batch_size,
                 self.train.activation_checkpointing)
        self.hooks = Hooks([self.faults, step_profiler(run.profile, env, attempt, run_dir, self.device),
                            self.reporter.first_step_memory(), *hooks, OutOfMemoryHook(env.rank, env.hostname, shape)])

    def load_checkpoint(self) -> bool:
        """The checkpoint this attempt starts from (resume=auto: the run's newest), if any. Returns whether a signal
        interrupted its evaluation (the resumed run evaluates first)."""
        clock = time.perf_counter()
        PROGRESS.phase("startup", "choosing and loading a checkpoint")
        resumed = self.resume.load()
        self.startup["checkpoint_load_s"] = time.perf_counter() - clock
        self.step = self.first_step = 0
        if resumed is None:
            return False
        self.step = self.first_step = self.saver.saved_step = resumed.step
        self.guard.resume(resumed.meta)
        return resumed.eval_pending

    @property
    def data_fingerprint(self) -> str | None:
        """The fingerprint of the prepared data this rank trains on."""
        return self.data.batches.dataset.fingerprint

    def fit(self) -> FitSummary:
        t = self.train
        self.hooks.started(self)
        self.reporter.show_banner()
        bar = ProgressBar(t, self.step, self.env.is_main)
        summary = FitSummary(first_step=self.first_step)
        self.reporter.new_window()
        if self.evaluator.pending and t.eval_interval:  # a signal interrupted it before the checkpoint: do it again
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
        self.flags.drain()
        bar.close()
        self.data.prefetch.close()
        PROGRESS.phase("finish", "the final save", self.step)
        self.stop.summarise(summary, self.step)
        finished = self.step >= t.max_steps and not self.stop.reason  # else a signal's save: the optimizer kept
        self.saver.final(self.step, self.evaluator.pending, finished)
        summary.last_step, summary.spent = self.step, self.spent.as_dict()
        summary.failed_saves = self.saver.failed_saves
        self.metrics.close()
        return summary

    def step_and_after(self, summary: FitSummary, bar: ProgressBar, started: float) -> bool:
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
            summary.logged(values)
        if self.evaluator.due(self.step):
            if not self.run_eval(summary, bar) or self.stop.after_eval(self.step, summary.val_loss,
                                                                       last=self.step >= t.max_steps):
                return False
        if self.reporter.exclusion is not None:  # saved below, like a preemption; the worker requeues without it
            self.stop.exclude(self.reporter.exclusion)
        elif self.saver.at_interval(self.step, self.evaluator.pending):
            self.reporter.window.start += self.saver.checkpointer.last_blocked_s  # saving is not training time
        return True

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step; at log intervals also the metrics record of the window it closes."""
        t, window, batches = self.train, self.reporter.window, self.data.batches
        lr = lr_at(self.step, t)
        PROGRESS.phase("step", f"step {self.step}", self.step)
        self.hooks.before_step(self.step)
        data_start = time.perf_counter()
        micro = self.data.prefetch.take(self.step)
        window.data_done(data_start, self.data.prefetch.read_s)
        # waiting for the others: communication time, not this rank's own work
        window.sync_wait(self.flags.exchange(self.step))
        if self.stop.reason is not None:  # every rank stops before this step, and saves
            batches.step = self.step
            return None
        log_now = (self.step + 1) % t.log_interval == 0 or self.step == t.max_steps - 1
        loss_factor = self.faults.loss_factor(batches.index(self.step))  # test-only: 1 unless debug.* says
        # a slow device (test-only) lags first, as a GPU's would; the profiler sees an out-of-memory first
        with self.hooks.around_step(self.step):
            result = self.strategy.train_step(micro, self.data.n_micro, lr, t.grad_clip,
                                              layer_norms=log_now and t.layer_grad_norms, loss_factor=loss_factor)
        self.hooks.after_step(self.step)
        window.step_done(result.clock)
        self.guard.after_step(self.step, result.skipped)  # a skipped update: the step and its batches are spent
        self.step += 1  # trained: a rollback the guard raises below undoes it too
        values = self.reporter.record(self.step, result, lr) if log_now else None  # at the steps done, as checkpoints
        if values is not None:  # the loss was read: the guard's tally is read with it
            self.guard.settle()
            self.guard.after_record(self.step - 1, values["loss"])
        return values

    def run_eval(self, summary: FitSummary, bar: ProgressBar) -> bool:
        """An evaluation after the current step; False when a preemption signal interrupted it."""
        values = self.evaluator.run(self.step, bar.write)
        if values is None:
            return False
        summary.evaluated(values)
        self.reporter.window.start = time.perf_counter()  # evaluation time is not training time
        return True

    def roll_back(self, r: Rollback) -> None:
        """divergence.policy=rollback: training goes on from the restored checkpoint's step, past the batches that
        were trained since (gpt.train.rollback)."""
        # a load costs about what a save does: the watchdog gives it the synchronous save's budget
        PROGRESS.phase("finish", f"divergence.policy=rollback: loading the checkpoint from before step {r.step}",
                       self.step)
        done = roll_back(r, self.resume, self.guard.cfg.max_rollbacks)
        self.spent.steps_undone += self.step - done.step  # trained, then undone: goodput counts them lost
        self.step = done.step
        self.saver.rolled_back(done.step)
        self.metrics.rewind(done.step)  # the records of the steps undone go, as at a resume
        self.metrics.write(done.step, done.record(r.step, r.count), kind="rollback")
        self.reporter.new_window()  # the window's steps were undone
