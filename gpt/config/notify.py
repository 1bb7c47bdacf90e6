"""The notify section: word when an attempt of the run ends (launch.run.notify). Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

from gpt.errors import ConfigError

EVENTS = ("finished", "failed", "diverged", "stopped early", "cancelled", "preempted", "requeued", "restarted")


@dataclass(frozen=True)
class NotifyConfig:
    # an http(s) URL: each event is POSTed as JSON {"text", "event", "run", "line"} (Slack's and Mattermost's
    # incoming webhooks show "text"); the URL is kept in the run's config.yaml (its user's alone unless
    # share_with_group: docs/security.md)
    webhook: str | None = None
    # a shell command: the text on its stdin, GPTLAUNCH_EVENT, GPTLAUNCH_RUN_DIR and GPTLAUNCH_TEXT in its
    # environment (`mail -s "gptlaunch" me@example.org`, `curl -d @- https://ntfy.sh/mytopic`)
    command: str | None = None
    # the events told; preempted: stopped by a signal and not requeued (Slurm or the user runs it again)
    on: tuple[str, ...] = ("finished", "failed", "diverged", "stopped early", "cancelled", "requeued")
    # a requeue or an in-job restart is told when the run's count of them reaches a multiple of this (1: each one)
    every: int = 5

    def validate(self) -> None:
        if self.webhook is not None and not self.webhook.startswith(("http://", "https://")):
            raise ConfigError("notify.webhook", self.webhook, "an http:// or https:// URL")
        unknown = [e for e in self.on if e not in EVENTS]
        if unknown:
            raise ConfigError("notify.on", list(self.on), f"a list of {', '.join(EVENTS)}")
        if isinstance(self.every, bool) or self.every < 1:
            raise ConfigError("notify.every", self.every, "a positive number of requeues")
