"""How a rank's parent (its task wrapper under Slurm, srun's launcher under cluster=srun) passes the preemption
signals on: it catches them from before the child starts, and passes each on once the child can take it. A rank
starts with them ignored (a signal during its seconds of start-up must not kill it) and handles them once its
flag is in place (launch.rank.worker.install_flag)."""
from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterable

from gpt.resilience.timing import RELAY_POLL_S
from launch.rank.rank_watch import RankWatch, reap


class SignalRelay:
    """Catches `signals` from now on; `wait` passes them on, in order, to a child."""

    def __init__(self, signals: Iterable[int]):
        self.received: list[int] = []  # every signal caught, passed on or not
        self.passed = 0  # how many of them went on: a child of a later round gets only those caught since
        self.previous = {s: signal.signal(s, lambda signum, _frame: self.received.append(signum)) for s in signals}

    def wait(self, child: subprocess.Popen, ready: Callable[[int], bool],
             stop: Callable[[], bool] = lambda: False, watch: RankWatch | None = None) -> int:
        """The child's exit code; meanwhile each signal caught goes on to it once `ready(signum)` says so. Once
        `stop()` says so (its round is over, launch.recovery.rounds), the child is killed, and the signals it got go to
        the next round's child too: a preemption during an in-job restart still saves and requeues. A `watch`
        kills the child past its deadline (a rank stuck inside a CUDA call)."""
        first = self.passed
        while True:
            try:
                return child.wait(timeout=RELAY_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            if stop():
                child.kill()
                self.passed = first
                return reap(child)
            if watch is not None and watch.overdue():
                return watch.kill(child)
            while self.passed < len(self.received) and ready(self.received[self.passed]):
                child.send_signal(self.received[self.passed])
                if watch is not None:
                    watch.signalled(self.received[self.passed])
                self.passed += 1

    def restore(self) -> None:
        """The handlers from before (a launcher that goes on after its child ended)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def ignore(signals: Iterable[int]) -> None:
    """In a child before it runs the rank (preexec_fn): those signals wait until the rank handles them."""
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` yet (Linux: SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return True  # cannot tell: pass it on
