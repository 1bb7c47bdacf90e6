"""How a feature reaches the training loop: through a `LoopHook`, which the trainer calls at fixed points of every
attempt, in the order it was given them. The loop's own features are hooks (fault injection, the profiler, the
first step's memory measurement), and so is what a caller adds (the rank's attempt, marked begun): a new one is a
hook, not another call in the loop."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from gpt.resilience.goodput import Spent


class RunningLoop(Protocol):
    """What a hook may read of the loop, live."""

    first_step: int  # the step this attempt began at (its checkpoint's)
    step: int  # the step it is at
    startup: dict[str, float]  # seconds per start-up phase so far
    spent: Spent  # where the attempt's time went so far (goodput)

    @property
    def data_fingerprint(self) -> str | None:
        """The fingerprint of the prepared data it trains on."""


class LoopHook:
    """Each point does nothing unless a feature overrides it."""

    def started(self, loop: RunningLoop) -> None:
        """Once, the checkpoint loaded, before the start-up banner and the first step."""

    def before_step(self, step: int) -> None:
        """At the top of every step, before its batch is taken."""

    def around_step(self, step: int) -> contextlib.AbstractContextManager:
        """Wraps the strategy's step: forward, backward and update."""
        return contextlib.nullcontext()

    def after_step(self, step: int) -> None:
        """After the strategy's step, before its metrics record."""

    def saved(self, step: int, path: Path) -> None:
        """On rank 0 alone, once the checkpoint of `step` is committed at `path` (complete, loadable)."""


class Hooks:
    """The loop's hooks, called in order (`around_step`: the first given is the outermost)."""

    def __init__(self, hooks: Iterable[LoopHook | None]):
        self.hooks = [h for h in hooks if h is not None]

    def started(self, loop: RunningLoop) -> None:
        for hook in self.hooks:
            hook.started(loop)

    def before_step(self, step: int) -> None:
        for hook in self.hooks:
            hook.before_step(step)

    @contextlib.contextmanager
    def around_step(self, step: int) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(hook.around_step(step))
            yield

    def after_step(self, step: int) -> None:
        for hook in self.hooks:
            hook.after_step(step)

    def saved(self, step: int, path: Path) -> None:
        for hook in self.hooks:
            hook.saved(step, path)
