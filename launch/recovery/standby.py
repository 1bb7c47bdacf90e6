"""The next round's rank, started ahead (launch.recovery.rounds): `python -m launch.rank.worker RUN_DIR --standby`
imports torch and gptlaunch, then waits for its round's variables on its stdin. An in-job restart then costs no
interpreter start and no imports (most of a rank's start-up on a loaded node). Torch-free: the task wrapper runs it."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable

from launch.rank.signal_relay import ignore


ASK_S = 1.0  # whether the round's rank is up is a file read on the shared file system: once a second at most


class Standby:
    """At most one waiting rank process of a task wrapper, started with `env` and the preemption `signals` ignored
    (as a rank starts; it handles them once its flag is in place)."""

    def __init__(self, run_dir: str, env: dict[str, str], signals: list[int], enabled: bool = True):
        self.command = [sys.executable, "-m", "launch.rank.worker", run_dir]
        self.env, self.signals, self.enabled = env, signals, enabled
        self.proc: subprocess.Popen | None = None
        self.asked = -ASK_S

    def start(self) -> None:
        if self.proc is None and self.enabled:
            self.proc = subprocess.Popen([*self.command, "--standby"], env=self.env, stdin=subprocess.PIPE, text=True,
                                         preexec_fn=functools.partial(ignore, self.signals))

    def start_when_up(self, up: Callable[[], bool]) -> None:
        """Start once `up()` says this round's rank has done its imports: the two would share the node's CPUs."""
        if self.proc is None and self.enabled and time.monotonic() - self.asked >= ASK_S:
            self.asked = time.monotonic()
            if up():
                self.start()

    def take(self, place: dict[str, str]) -> subprocess.Popen:
        """The rank of a round placed by `place`: the waiting process if it is still there, else a new one."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(json.dumps(place) + "\n")
                proc.stdin.close()
                return proc
            except OSError:  # it died meanwhile
                proc.kill()
        return subprocess.Popen(self.command, env={**self.env, **place},
                                preexec_fn=functools.partial(ignore, self.signals))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
