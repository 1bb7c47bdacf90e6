"""A watchdog thread in every rank. It writes the rank's heartbeat (what gpt.progress says it is doing) into the
run folder every `interval_s`, and when the rank has made no progress for longer than its budget, or another
rank has reported a hang, it writes the hang report and hands over to `on_hang`, which ends the attempt.

The reports, in the run folder:
    hang-<attempt>.json   the first rank to time out writes it: the summary line, every rank's heartbeat, who
                          waited in which collective, who never arrived, who is gone
    hang-<attempt>.txt    the same, readable, then every rank's Python stacks (faulthandler, all threads)
    hang-<attempt>-flight-recorder-rank<R>.pkl   on NCCL, torch's flight recorder (its last collectives)

The thread only reads the main thread's marks and writes files: a rank stuck in a collective, in C code, or in
a sleep still has a watchdog that speaks (gloo and NCCL release the GIL while they wait).
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gpt.hang_report import Hang, heartbeat_path, read_heartbeats, write_heartbeat
from gpt.progress import PROGRESS, Progress
from gpt.run_config import WatchdogConfig

log = logging.getLogger(__name__)


def report_paths(run_dir: Path, attempt: int) -> tuple[Path, Path]:
    return run_dir / f"hang-{attempt}.json", run_dir / f"hang-{attempt}.txt"


class Watchdog:
    def __init__(self, cfg: WatchdogConfig, run_dir: Path, rank: int, world: int, host: str, attempt: int,
                 on_hang: Callable[[dict | None], None], progress: Progress = PROGRESS,
                 master: tuple[str, int] | None = None):
        self.cfg, self.run_dir, self.rank, self.world, self.host = cfg, run_dir, rank, world, host
        self.attempt, self.on_hang, self.progress, self.master = attempt, on_hang, progress, master
        self.reaches_master: bool | None = None  # probed only while this rank is stuck
        self.probed = 0.0
        self.ended: str | None = None  # how this rank ends, once it knows: a vanished rank never says
        self.fired = threading.Lock()  # the report is made once, by the thread or by the main thread
        self.json_path, self.text_path = report_paths(run_dir, attempt)
        self.thread = threading.Thread(target=self._run, name="gptlaunch-watchdog", daemon=True)

    def start(self) -> Watchdog:
        heartbeat_path(self.run_dir, self.rank).parent.mkdir(parents=True, exist_ok=True)
        self.beat()
        self.thread.start()
        return self

    def budget(self) -> tuple[str, float, float]:
        """The budget that applies now: its key, its seconds, and the seconds used of it."""
        p, now = self.progress, time.monotonic()
        kind = p.kind if p.first_step_done else "startup"
        key, seconds = self.budget_for(kind)
        return key, seconds, now - (p.started if kind == "startup" else p.since)

    def budget_for(self, kind: str) -> tuple[str, float]:
        c = self.cfg
        if kind == "startup":
            return "watchdog.startup_s", c.startup_s
        if kind in ("save", "finish"):
            return "watchdog.save_s", c.save_s
        if kind == "eval":
            return "watchdog.eval_s", c.eval_s
        if c.step_s != "auto":
            return "watchdog.step_s", float(c.step_s)
        return "watchdog.step_s (auto)", max(c.step_floor_s, c.step_factor * (self.progress.p99_step_s() or 0.0))

    def closest(self) -> dict[str, float]:
        """Per budget, the largest share of it this rank has used so far: the margin against false alarms."""
        out: dict[str, float] = {}
        for kind, used in list(self.progress.longest.items()):
            key, seconds = self.budget_for(kind)
            out[key] = round(max(out.get(key, 0.0), used / seconds), 4)
        return out

    def probe(self) -> None:
        """While stuck past half its budget, whether this rank still reaches the master (the rendezvous store's
        port) over the network: a rank that cannot is cut off, which its heartbeat file alone would not show
        where the run folder is on another network."""
        if self.master is None or time.monotonic() - self.probed < PROBE_EVERY_S:
            return
        self.probed = time.monotonic()
        try:
            socket.create_connection(self.master, timeout=PROBE_TIMEOUT_S).close()
            self.reaches_master = True
        except OSError:
            self.reaches_master = False

    def beat(self) -> None:
        _, seconds, used = self.budget()
        if used > seconds / 2:
            self.probe()
        else:
            self.reaches_master = None
        record = {"rank": self.rank, "host": self.host, "pid": os.getpid(), "attempt": self.attempt,
                  "time": time.time(), "reaches_master": self.reaches_master, "ended": self.ended,
                  "closest": self.closest(), "longest_s": {k: round(v, 3) for k, v in self.progress.longest.items()},
                  **self.progress.snapshot()}
        write_heartbeat(self.run_dir, self.rank, record)

    def _run(self) -> None:
        while True:
            time.sleep(self.cfg.interval_s)
            try:
                self.beat()
            except OSError as e:  # a full or lost filesystem must not kill the rank; the others will notice
                log.warning("watchdog: cannot write the heartbeat: %s", e)
            key, seconds, used = self.budget()
            if used > seconds or self.json_path.exists():
                self.fire(key, seconds, used)
                return

    def fire(self, key: str, seconds: float, used: float) -> None:
        """End the attempt: the report, then `on_hang` (which does not return). Only the first caller does."""
        if not self.fired.acquire(blocking=False):
            return
        self.progress.halt()
        self.on_hang(self.report(key, seconds, used))

    def end(self, how: str) -> None:
        """This rank is about to exit (finished, failed): the other ranks must not take it for a lost one."""
        self.ended = how
        self.beat()

    def lost_peers(self) -> list[int]:
        """After a collective failed here: the ranks that vanished (their heartbeat stopped, and they never said
        they were ending), waiting as long as a heartbeat takes to go stale. Empty when a rank said it failed:
        that rank's error is the job's, and the job fails as it should."""
        stale = max(10 * self.cfg.interval_s, SCHEDULER_GRACE_S)  # a task Slurm saw die: Slurm ends the job first
        deadline = time.time() + stale + 2 * self.cfg.interval_s
        while time.time() < deadline:
            beats = read_heartbeats(self.run_dir, self.world, self.attempt)
            others = [(r, b) for r, b in enumerate(beats) if r != self.rank]
            if any(b is not None and b.get("ended") for _, b in others):
                return []
            lost = [r for r, b in others if b is not None and time.time() - b["time"] > stale]
            if lost:
                return lost
            time.sleep(self.cfg.interval_s)
        return []

    def stale_s(self) -> float:
        """A live rank rewrites its heartbeat every interval_s; three missed ones mean it is gone. Shorter than
        any budget worth having, so that a rank lost mid-collective is named gone when the others time out."""
        return max(3 * self.cfg.interval_s, 3.0)

    def report(self, key: str, seconds: float, used: float) -> dict | None:
        """Write this rank's part of the hang report; the full report (a dict) if this rank wrote it first."""
        mine = None
        if self.reaches_master is False:  # cut off: leave the report (and the requeue) to a rank that is not
            time.sleep(2 * self.cfg.interval_s + PROBE_TIMEOUT_S + 2)
        try:
            fd = os.open(self.json_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            fd = None
        if fd is not None:  # the first rank to time out writes the report
            time.sleep(self.cfg.interval_s + 0.5)  # every live rank's heartbeat is fresh by now
            mine = self._summarise(fd, key, seconds, used)
        else:  # the summary goes first in the readable report
            deadline = time.monotonic() + 2 * self.cfg.interval_s + 5
            while self.json_path.stat().st_size == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
        self._append(f"\n=== rank {self.rank} on {self.host} (pid {os.getpid()}): every thread's stack ===\n"
                     + stacks())
        self._flight_recorder()
        return mine

    def _summarise(self, fd: int, key: str, seconds: float, used: float) -> dict:
        hang = Hang.from_heartbeats(read_heartbeats(self.run_dir, self.world, self.attempt),
                                    stale_s=self.stale_s())
        line = f"watchdog: {hang.summary()}; report: {self.text_path}"
        report = {"attempt": self.attempt, "time": time.time(), "detected_by": self.rank, "host": self.host,
                  "budget": key, "budget_s": round(seconds, 3), "idle_s": round(used, 3), "summary": line,
                  "report": str(self.text_path), **hang.as_dict()}
        rows = "\n".join(f"  rank {r}: " + (json.dumps(b) if b else "no heartbeat this attempt")
                         for r, b in enumerate(hang.beats))
        why = f"{key}={seconds:.1f} s" if seconds else key
        self._append(f"{line}\n\nrank {self.rank} on {self.host} saw no progress for {used:.1f} s "
                     f"({why}).\nEvery rank's last heartbeat:\n{rows}\n")
        with os.fdopen(fd, "w") as f:  # last: the other ranks wait for it to add their stacks below
            json.dump(report, f, indent=1)
        return report

    def _append(self, text: str) -> None:
        """One write per part: ranks on several hosts append to the same report."""
        fd = os.open(self.text_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def _flight_recorder(self) -> None:
        """On NCCL, torch's flight recorder: the last collectives this rank's communicators saw."""
        import torch.distributed as dist

        if not dist.is_initialized() or "nccl" not in str(dist.get_backend()):
            return
        try:
            from torch._C._distributed_c10d import _dump_fr_trace

            path = self.run_dir / f"hang-{self.attempt}-flight-recorder-rank{self.rank}.pkl"
            path.write_bytes(_dump_fr_trace())
        except Exception as e:  # the dump is a bonus: the report stands without it
            log.warning("watchdog: no flight recorder dump: %s", e)


SCHEDULER_GRACE_S = 10.0
PROBE_EVERY_S = 5.0
PROBE_TIMEOUT_S = 3.0


def stacks() -> str:
    """Every thread's Python stack, as faulthandler prints it (it needs a real file)."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()


def flight_recorder_env(run_dir: Path) -> dict[str, str]:
    """torch's NCCL flight recorder on, dumping into the run folder if NCCL itself times out."""
    return {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": str(run_dir / "nccl-flight-recorder-rank")}
