"""Evaluation at train.eval_interval, on every rank alike: the validation loss over the data-parallel replicas and the
eval.tasks scores. A preemption signal interrupts it (every rank agrees between batches); the checkpoint then says
so (`pending`), and the resumed run evaluates first."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from gpt.config.train import TrainConfig
from gpt.eval.multiple_choice import TaskScorer
from gpt.parallel.base import Strategy
from gpt.resilience.goodput import Spent
from gpt.resilience.progress import PROGRESS
from gpt.train.metrics import MetricsWriter
from gpt.train.stop import StopControl


class Evaluator:
    def __init__(self, train: TrainConfig, strategy: Strategy, val: Iterable, tasks: TaskScorer | None,
                 stop: StopControl, metrics: MetricsWriter, spent: Spent, pending: bool = False):
        """`pending`: the checkpoint this attempt resumed from was saved with its evaluation interrupted."""
        self.train, self.strategy, self.val, self.tasks = train, strategy, val, tasks
        self.stop, self.metrics, self.spent = stop, metrics, spent
        self.pending = pending

    def due(self, step: int) -> bool:
        """After `step` steps: at every eval_interval, and at the last step."""
        every = self.train.eval_interval
        return bool(every) and (step % every == 0 or step == self.train.max_steps)

    def run(self, step: int, say: Callable[[str], None]) -> dict[str, float] | None:
        """Evaluate after `step` steps, timed as evaluation, and `say` its line (the progress bar's). Returns the
        values (the loss, the tasks' scores), or None when a preemption signal interrupted it."""
        PROGRESS.phase("eval", f"evaluation at step {step}", step)
        with self.spent.timed("eval_s"):
            values = self.evaluate(step)
        if values is not None:
            accuracies = "".join(f", {k.removeprefix('tasks/')} {v:.3f}" for k, v in values.items()
                                 if k.endswith("/acc"))
            say(f"step {step}: val loss {values['loss']:.4f}{accuracies}")
        return values

    def evaluate(self, step: int) -> dict[str, float] | None:
        """The validation loss and the eval.tasks scores, recorded; None when a preemption signal interrupted them
        (the resumed run evaluates again)."""
        s = self.strategy
        s.model.eval()
        loss = validation_loss(s, self.val, self.stop.signalled_anywhere)
        values: dict[str, Any] | None = None if loss is None else {"loss": loss}
        if values is not None and self.tasks is not None:
            scores = self.tasks.score(s.forward_loss, s.dp_rank, s.dp_size, s.dp_group, self.stop.signalled_anywhere,
                                      s.device)
            values = None if scores is None else {**values, **scores}
        s.model.train()
        self.pending = values is None
        if values is not None:
            self.metrics.write(step, values, kind="val")
        return values


def validation_loss(strategy: Strategy, batches: Iterable, interrupted: Callable[[], bool]) -> float | None:
    """The mean validation loss over the data-parallel replicas; None once a preemption signal interrupts it. Every
    batch of every rank holds as many sequences (ValBatches), so this mean of means is the mean over the whole set."""
    total, count = torch.zeros((), device=strategy.device), 0
    for x, y in batches:
        if interrupted():
            return None
        total += strategy.forward_loss(x, y)
        count += 1
    return strategy.mean_over_dp(total / max(count, 1)).item()
