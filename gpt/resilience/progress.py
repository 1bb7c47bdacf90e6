"""What this rank is doing right now, for its watchdog (launch.recovery.watchdog): the main thread marks each phase
(start-up, a step, a save, an evaluation) and every collective it enters and leaves; the watchdog thread reads the
marks.

One instance per process (PROGRESS), because collectives are called from everywhere (the trainer, checkpoints,
the straggler monitor) and each of them should mark itself without being handed an object. A mark is a few
attribute writes: cheap enough for every collective of every step.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

KINDS = ("startup", "step", "save", "eval", "finish")  # each has its own budget (WatchdogConfig)


@dataclass
class Progress:
    kind: str = "startup"
    what: str = "starting"
    step: int | None = None
    inside: str | None = None  # the collective this rank is in now, if any
    last_collective: str | None = None  # the last one it entered, and at which step
    last_collective_step: int | None = None
    seq: int = 0  # collectives entered so far: a rank behind the others never arrived at theirs
    since: float = field(default_factory=time.monotonic)  # the last mark
    started: float = field(default_factory=time.monotonic)
    first_step_done: bool = False  # until then start-up's budget applies
    failed_in: str | None = None  # a collective that raised (a peer closed its connection, a timeout)
    halted: bool = False  # the watchdog has ended this attempt: the main thread must not go on
    step_times: deque = field(default_factory=lambda: deque(maxlen=1000))
    save_times: deque = field(default_factory=lambda: deque(maxlen=100))  # whole saves, from their phase marks
    longest: dict = field(default_factory=dict)  # per kind, the longest stretch without a mark
    _step_began: float = 0.0
    _save_began: float = 0.0

    def _mark(self, now: float) -> None:
        used = now - self.since
        self.longest[self.kind] = max(self.longest.get(self.kind, 0.0), used)
        self.since = now

    def restart(self) -> None:
        """As this process's own start: a rank forked from a preloaded server imported this module when the server
        started, maybe a sweep point or a round earlier, and start-up's budget counts from the rank's start."""
        self.__init__()

    def halt(self) -> None:
        """The watchdog has decided how this attempt ends (and may have requeued the job): a main thread that
        comes back from its stuck call (a link that works again) stops at its next mark instead of training on,
        saving or writing a second line for the attempt; the watchdog thread ends the process, within a bound
        whatever its report does (Watchdog.fire)."""
        self.halted = True

    def stop_if_halted(self) -> None:
        if self.halted and threading.current_thread() is threading.main_thread():
            threading.Event().wait()

    def phase(self, kind: str, what: str, step: int | None = None) -> None:
        self.stop_if_halted()
        now = time.monotonic()
        if self.kind == "step":  # the step marked before this one has ended
            # the first step is start-up's last part (warm-up, allocations): its time would inflate p99
            if self.first_step_done:
                self.step_times.append(now - self._step_began)
            self.first_step_done = True
        if self.kind == "save":
            self.save_times.append(now - self._save_began)
        if kind == "step":
            self._step_began = now
        if kind == "save":
            self._save_began = now
        self._mark(now)
        self.kind, self.what, self.step = kind, what, step

    def resumed(self, frozen_s: float) -> None:
        """The process was stopped for about `frozen_s` (Ctrl-Z, SIGSTOP): no phase spent that time. Never past
        now: the main thread may have marked since it woke."""
        now = time.monotonic()
        for name in ("since", "started", "_step_began", "_save_began"):
            setattr(self, name, min(getattr(self, name) + frozen_s, now))

    def wrote(self, now: float) -> None:
        """The watchdog saw this rank's save write since its last look: progress, as a mark is (no longest stretch
        is recorded: the main thread's own marks keep those)."""
        self.since = max(self.since, now)

    @contextlib.contextmanager
    def collective(self, name: str) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # a background save's own group
            yield
            return
        self.stop_if_halted()
        self.seq += 1
        self.inside = self.last_collective = name
        self.last_collective_step = self.step
        self._mark(time.monotonic())
        try:
            yield
        except BaseException:
            self.failed_in = name
            raise
        finally:
            self.inside = None
            self._mark(time.monotonic())
            self.stop_if_halted()

    def p99_step_s(self) -> float | None:
        if not self.step_times:
            return None
        times = sorted(self.step_times)
        return times[min(len(times) - 1, int(0.99 * len(times)))]

    def longest_save_s(self) -> float | None:
        return max(self.save_times, default=None)

    def snapshot(self) -> dict:
        now = time.monotonic()
        return {"kind": self.kind, "what": self.what, "step": self.step, "collective": self.inside,
                "last_collective": self.last_collective, "last_collective_step": self.last_collective_step,
                "seq": self.seq, "idle_s": round(now - self.since, 3), "up_s": round(now - self.started, 3)}


PROGRESS = Progress()
