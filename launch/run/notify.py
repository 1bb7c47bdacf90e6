"""Word when an attempt of a run ends (the `notify` section): a webhook and a command, told by the one place that
writes an attempt's line (launch.run.attempts), so every ending is told once, whichever process recorded it: the
rank that finished, the task of a killed rank, the next attempt for one killed outright. Best effort: a webhook that
does not answer costs the run one line in its log, never the attempt."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import urllib.request
from pathlib import Path

from gpt.config.notify import NotifyConfig
from gpt.errors import UserError
from gpt.run_folder import CANCELLED, CTRL_C, AttemptLine, Next, RunFolder
from launch import launch_config

log = logging.getLogger(__name__)
TIMEOUT_S = 10.0  # a webhook or command that takes longer is given up: the attempt's end must not wait on it


def event_of(line: AttemptLine) -> str:
    """What the line tells, in the words of notify.on."""
    if line.finished:
        return "finished"
    if line.stopped_early:
        return "stopped early"
    if line.ended.startswith(CANCELLED) or line.ended == CTRL_C:  # the user stopped it
        return "cancelled"
    if line.ended.startswith("diverged"):
        return "diverged"
    if line.next is Next.RESTART:
        return "restarted"
    if line.next is Next.REQUEUE:
        return "requeued"
    return "preempted" if line.ended.startswith("preempted") else "failed"


def text_of(run_dir: Path, line: AttemptLine, event: str, count: int) -> str:
    times = f" ({_nth(count)} time)" if event in ("requeued", "restarted") else ""
    steps = f" at step {line.last_step}" if line.last_step is not None else ""
    said = line.ended.removeprefix(event).lstrip(": ")  # "failed: ValueError ..." says its word once
    detail = "; ".join(filter(None, [said, line.note]))
    return f"gptlaunch: {run_dir.name} {event}{times}{steps}{': ' + detail if detail else ''} ({run_dir})"


def _nth(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def notify(run_dir: Path) -> None:
    """Tell the newest line of the run's attempts log, where the run's notify section asks for it."""
    folder = RunFolder(run_dir)
    try:
        config = launch_config.load(folder.config).notify
        lines = folder.attempts.read()
    except (UserError, OSError):  # no readable config (a test's bare folder, a storage fault): nobody to tell
        return
    if not lines or not (config.webhook or config.command):
        return
    event = event_of(lines[-1])
    count = sum(event_of(line) == event for line in lines)
    if event not in config.on or (event in ("requeued", "restarted") and count % config.every):
        return
    text = text_of(run_dir, lines[-1], event, count)
    if config.webhook:
        _post(config, run_dir, event, text, lines[-1])
    if config.command:
        _run(config, run_dir, event, text)


def _post(config: NotifyConfig, run_dir: Path, event: str, text: str, line: AttemptLine) -> None:
    body = json.dumps({"text": text, "event": event, "run": str(run_dir), "ended": line.ended,
                       "last_step": line.last_step}).encode()
    request = urllib.request.Request(config.webhook, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
            answer.read()
    except (OSError, ValueError) as e:
        log.warning("notify.webhook: not told (%s); the run goes on", e)


def _run(config: NotifyConfig, run_dir: Path, event: str, text: str) -> None:
    env = {**os.environ, "GPTLAUNCH_EVENT": event, "GPTLAUNCH_RUN_DIR": str(run_dir), "GPTLAUNCH_TEXT": text}
    try:
        done = subprocess.run(config.command, shell=True, input=text, text=True, env=env, timeout=TIMEOUT_S,
                              capture_output=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("notify.command: not run to its end (%s); the run goes on", e)
        return
    if done.returncode != 0:
        log.warning("notify.command exited with code %d: %s", done.returncode,
                    (done.stderr.strip().splitlines() or [""])[-1])
