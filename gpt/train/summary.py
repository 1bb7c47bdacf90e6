"""What one attempt's training returns (`Trainer.fit`): the steps it ran, the last figures it saw, how it stopped
and where its time went. Rank 0 writes it, with the world's size, as the run's summary.json (`as_dict`), which a
sweep's objective and the launcher's last line read."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FitSummary:
    first_step: int = 0  # the step this attempt began at (its checkpoint's)
    last_step: int = 0  # the step it stopped at: every step before it is trained
    train_loss: float | None = None  # of the last log window
    tokens_per_s: float | None = None
    val_loss: float | None = None  # of the last evaluation
    tasks: dict[str, float] = field(default_factory=dict)  # eval.tasks' scores of the last evaluation ("tasks/...")
    # Why every rank stopped before the last step: a signal's name, or "straggler" with the `exclusion` decided; a
    # sweep's early stop is `stopped_early` alone (a point that is done, not one to requeue)
    preempted: str | None = None
    exclusion: dict[str, Any] | None = None
    stopped_early: str | None = None
    spent: dict[str, float] = field(default_factory=dict)  # where the attempt's time went (gpt.resilience.goodput)
    failed_saves: list[int] = field(default_factory=list)  # steps whose save storage refused (checkpoint.on_save_error)

    def logged(self, values: dict[str, Any]) -> None:
        """A log window's metrics record."""
        self.train_loss, self.tokens_per_s = values["loss"], values["tokens_per_s"]

    def evaluated(self, values: dict[str, float]) -> None:
        """An evaluation's values: the validation loss, and the scores of eval.tasks."""
        self.val_loss = values["loss"]
        self.tasks.update({k: v for k, v in values.items() if k.startswith("tasks/")})

    def as_dict(self) -> dict[str, Any]:
        """summary.json's fields: the values set, each task's score under its own key."""
        plain = {"first_step": self.first_step, "last_step": self.last_step, "train_loss": self.train_loss,
                 "tokens_per_s": self.tokens_per_s, "val_loss": self.val_loss, **self.tasks,
                 "exclusion": self.exclusion, "stopped_early": self.stopped_early, "preempted": self.preempted,
                 "spent": self.spent, "failed_saves": self.failed_saves}
        return {k: v for k, v in plain.items() if v is not None and v != []}
