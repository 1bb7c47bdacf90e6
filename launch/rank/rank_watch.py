"""A task wrapper's deadline for its rank: a rank stuck inside a CUDA call ignores SIGTERM, and its watchdog may
never run (the call holds the interpreter), so once the rank should end (a stop signal passed on, its attempt ended)
it has a deadline, after which its wrapper kills it (SIGKILL). Torch-free: it runs in every task wrapper."""
from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from launch import launch_config
from gpt.resilience.timing import ENDED_EXIT_S, ENDED_LOOK_S, KILL_WAIT_S


class RankWatch:
    """When `who` (the rank) must have ended, and why. `ended()` says whether its attempt has ended (read from the
    run folder at most every ENDED_LOOK_S)."""

    def __init__(self, who: str, ended: Callable[[], bool], signalled_s: float, ended_s: float | None = None,
                 look_s: float | None = None):
        self.who, self.ended, self.signalled_s = who, ended, signalled_s
        self.ended_s = ENDED_EXIT_S if ended_s is None else ended_s
        self.look_s = ENDED_LOOK_S if look_s is None else look_s
        self.due: float | None = None
        self.why = ""
        self.looked = -self.look_s
        self.saw_end = False
        self.killed = ""  # the line said when the wrapper killed the rank

    def _after(self, seconds: float, why: str) -> None:
        due = time.monotonic() + seconds
        if self.due is None or due < self.due:
            self.due, self.why = due, f"within {seconds:.0f} s after {why}"

    def signalled(self, signum: int) -> None:
        """A stop signal went on to the rank: it saves and ends, or its watchdog ends it."""
        self._after(self.signalled_s, f"{signal.Signals(signum).name} was passed on to it")

    def overdue(self) -> bool:
        now = time.monotonic()
        if not self.saw_end and now - self.looked >= self.look_s:
            self.looked = now
            if self._ended():
                self.saw_end = True
                self._after(self.ended_s, "its attempt ended")
        return self.due is not None and time.monotonic() >= self.due

    def _ended(self) -> bool:
        try:
            return self.ended()
        except OSError:  # the run folder's storage fails: no deadline from it, this time
            return False

    def kill(self, child: subprocess.Popen) -> int:
        """Past the deadline: SIGKILL, said in one line (`killed`); the child's exit code."""
        self.killed = f"{self.who} did not end {self.why} (stuck inside a GPU call?): killed it (SIGKILL)"
        child.kill()
        return reap(child)


def signalled_exit_s(config_file: Path) -> float:
    """A signalled rank's deadline: the run's longest watchdog budget (the step and the save the signal waits for),
    then an ended attempt's."""
    return launch_config.load(config_file).watchdog.process_group_timeout() + ENDED_EXIT_S


def reap(child: subprocess.Popen) -> int:
    """The exit code of a child just sent SIGKILL; one stuck in the kernel (an uninterruptible driver call) is left
    there after KILL_WAIT_S: waiting on would park the allocation all the same."""
    try:
        return child.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        return -signal.SIGKILL
