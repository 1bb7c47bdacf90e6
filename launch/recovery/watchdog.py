"""A watchdog thread in every rank. It writes the rank's heartbeat (what gpt.resilience.progress says it is doing) into
the run folder every `interval_s`, and when the rank has made no progress for longer than its budget (in a save, once
no slower peer still saves within its own), or another rank has reported a hang (looked for only while this rank is
stuck itself), it ends the attempt (Watchdog.fire): one rank decides and requeues through `on_hang` first, then every
rank adds to the report as far as the storage lets it, and the process exits within HANG_EXIT_S whatever happens (a
report on a full or lost file system must not park the allocation).

The report (launch.recovery.hang writes its files): the first rank to time out writes the summary line, every
rank's heartbeat, who waited in which collective (from torch's flight recorder where it has dumps, preferred to the
heartbeats), who never arrived and who is gone; then every rank adds its Python stacks.

The thread only reads the main thread's marks and writes files: a rank stuck in a collective, in C code, or in
a sleep still has a watchdog that speaks (gloo and NCCL release the GIL while they wait).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from gpt.resilience.disk_faults import Outage
from launch.recovery.flight_recorder import stuck_in
from launch.recovery.hang import Hang
from launch.recovery.hang import HangReport
from launch.recovery.heartbeat import Liveness, read_heartbeats, write_heartbeat
from gpt.resilience.lease import fence, fenced_generation
from launch.recovery.node_heartbeat import NodeHeartbeat
from launch.recovery.peer_view import NodeView
from launch.recovery.slow_saves import SAVES, WriteWatch, slower_savers
from gpt.resilience.progress import PROGRESS, Progress
from gpt.resilience.timing import (HANG_EXIT_S, PROBE_EVERY_S, PROBE_TIMEOUT_S, REPORTER_GRACE_S, REQUEUE_WAIT_S,
                                   FROZEN_S, SILENT_S)
from gpt.config.sections import WatchdogConfig
from gpt.errors import EXIT_HANG
from gpt.run_folder import RunFolder

log = logging.getLogger(__name__)


class Watchdog:
    """`on_hang(report)` ends the attempt on the scheduler's side: given the report (this rank acts), it records the
    attempt and requeues the job; given None, it learns what the acting rank did. It returns whether the job was
    requeued (the rank then waits for the scheduler to stop it)."""

    def __init__(self, cfg: WatchdogConfig, run_dir: Path, rank: int, world: int, host: str, attempt: int,
                 on_hang: Callable[[dict | None], bool], progress: Progress = PROGRESS,
                 master: tuple[str, int] | None = None, restart: int = 0, report_name: Callable[[], str] | None = None):
        self.cfg, self.run_dir, self.rank, self.world, self.host = cfg, run_dir, rank, world, host
        self.attempt, self.on_hang, self.progress, self.master = attempt, on_hang, progress, master
        self.restart, self.beats_sent = restart, 0  # the heartbeat's (restart, sequence number)
        self.node = NodeHeartbeat(run_dir, host, rank, cfg.interval_s)  # steady beats: one record per node
        self.liveness = Liveness()  # the peers' heartbeats, watched while this rank is stuck
        self.view = NodeView(self.node.local, cfg.interval_s, "peers")  # what the node's stuck ranks read of peers
        self.reaches_master: bool | None = None  # probed only while this rank is stuck
        self.probed = 0.0
        self.ended: str | None = None  # how this rank ends, once it knows: a vanished rank never says
        self.waiting_for: list[int] = []  # past its save budget, the slower peers still saving within theirs
        self.writes = WriteWatch()  # this rank's own save writing
        self.fired = threading.Lock()  # the attempt is ended once, by the thread or by the main thread
        self.exit_by: float | None = None  # after fire(), the monotonic time by which the process is gone
        self.outage = Outage("the heartbeat", RunFolder(run_dir).heartbeat(rank).parent,
                             "its peers may take this rank for a lost one")
        # `report_name`: the attempt's own id; a count of attempts can repeat (launch.run.attempts.hang_report_name)
        self.report = HangReport(run_dir, report_name or (lambda: str(attempt)), rank, host, world, cfg.interval_s)
        self.thread = threading.Thread(target=self._run, name="gptlaunch-watchdog", daemon=True)

    def start(self) -> Watchdog:
        RunFolder(self.run_dir).watchdog.mkdir(parents=True, exist_ok=True)
        self.beat()
        self.thread.start()
        return self

    def budget(self, now: float | None = None) -> tuple[str, float, float]:
        """The budget that applies at `now` (default: now): its key, its seconds, and the seconds used of it."""
        p, now = self.progress, time.monotonic() if now is None else now
        kind = p.kind if p.first_step_done else "startup"
        key, seconds = self.budget_for(kind)
        return key, seconds, now - p.since  # start-up too: each of its phases in turn (a large checkpoint's load)

    def budget_for(self, kind: str) -> tuple[str, float]:
        c = self.cfg
        if kind == "startup":
            return "watchdog.startup_s", c.startup_s
        if kind in SAVES:  # the final save is synchronous even where the others are not: unlike them
            return self._save_budget(measured=kind == "save")
        if kind == "eval":
            return "watchdog.eval_s", c.eval_s
        if c.step_s != "auto":
            return "watchdog.step_s", float(c.step_s)
        return "watchdog.step_s (auto)", max(c.step_floor_s, c.step_factor * (self.progress.p99_step_s() or 0.0))

    def _save_budget(self, measured: bool) -> tuple[str, float]:
        """From the saves measured so far, as the step budget is from the steps: a peer lost in a save is seen as
        soon as one lost in a step."""
        c = self.cfg
        if c.save_s != "auto":
            return "watchdog.save_s", float(c.save_s)
        longest = self.progress.longest_save_s() if measured else None
        if longest is None:
            return "watchdog.save_first_s", c.save_first_s
        return "watchdog.save_s (auto)", max(c.save_floor_s, c.step_factor * longest)

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

    def beat(self, last: bool = False) -> None:
        """Every beat goes through the node's record; the `last` one (the rank ends) also into this rank's own file,
        which outlives the node's writer. An ended rank beats on until it exits: a survivor that reports its
        peers' loss must not look gone itself."""
        _, seconds, used = self.budget()
        if used > seconds / 2:
            self.probe()
        else:
            self.reaches_master = None
        self.beats_sent += 1
        record = {"rank": self.rank, "host": self.host, "pid": os.getpid(), "attempt": self.attempt,
                  "restart": self.restart, "beat": self.beats_sent, "time": time.time(),
                  "budget_left_s": round(seconds - used, 3), "reaches_master": self.reaches_master, "ended": self.ended,
                  "closest": closest(self.progress, self.budget_for),
                  "longest_s": {k: round(v, 3) for k, v in self.progress.longest.items()}, **self.progress.snapshot(),
                  "generation": fenced_generation()}
        if last:
            write_heartbeat(self.run_dir, self.rank, record)
        self.node.beat(record)

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            time.sleep(self.cfg.interval_s)
            try:
                self.beat()
            except OSError as e:  # a full or lost filesystem must not kill the rank; the others will notice
                self.outage.failed(e)
            else:
                self.outage.recovered()
            # A stop (Ctrl-Z, SIGSTOP) anywhere in this turn, its beat's file writes included, is a gap since the
            # last turn's reading; the budget is judged at this same reading, so a stop after it only delays the
            # judgement and is credited at the next turn.
            now = time.monotonic()
            if (overran := now - last - self.cfg.interval_s) > FROZEN_S:
                self.progress.resumed(overran)
            last = now
            if self.writes.moved() and self.progress.kind in SAVES:
                self.progress.wrote(now)  # a save that writes progresses, however long it takes
            key, seconds, used = self.budget(now)
            # stuck for a while: watch the peers, to tell the gone from the slow, and look for another rank's report (a
            # rank that still progresses makes no lookup on the shared file system; one that waits for a hung peer is
            # stuck itself by then), as this node read them: its stuck ranks make one read per interval between them
            beats, reported = self.shared_peers() if used > seconds / 2 else ([], False)
            if (used > seconds and not self.waits_for_slower_savers(beats, used)) or reported:
                self.fire(key, seconds, used)
                return

    def waits_for_slower_savers(self, beats: list[dict | None], used: float) -> bool:
        """Past its budget in a save, whether a peer still saves within its own (launch.recovery.slow_saves); never
        past the run's longest fixed budget, which the process group's timeout and the task wrappers count on."""
        if self.progress.kind not in SAVES or used > self.cfg.longest_budget_s():
            return False
        slower = slower_savers(beats, self.liveness, self.rank, self.stale_s())
        if slower and not self.waiting_for:
            log.warning("watchdog: past this rank's save budget after %.0f s; rank(s) %s still save within their own: "
                        "waiting for them", used, ", ".join(map(str, slower)))
        self.waiting_for = slower
        return bool(slower)

    def shared_peers(self) -> tuple[list[dict | None], bool]:
        """The peers' heartbeats and whether another rank reported the hang, as this node read them within an interval
        (launch.recovery.peer_view), fed to the liveness record."""
        key = [str(self.report.json_path), self.restart, fenced_generation(), self.world]
        seen = self.view.read(key, lambda: {"beats": read_heartbeats(self.run_dir, self.world, self.attempt,
                                                                     self.restart),
                                            "reported": self.report.reported_elsewhere()})
        self.liveness.observe(seen["beats"])
        return seen["beats"], seen["reported"]

    def peers(self) -> list[dict | None]:
        """Every rank's heartbeat, read now and fed to the liveness record (None where unreadable)."""
        beats = read_heartbeats(self.run_dir, self.world, self.attempt, self.restart)
        self.liveness.observe(beats)
        return beats

    def fire(self, key: str, seconds: float, used: float) -> None:
        """End the attempt; does not return. Only the first caller acts: the rank that decides requeues first,
        then every rank reports as far as the storage lets it, and the process exits whatever happens."""
        if not self.fired.acquire(blocking=False):
            return
        self.progress.halt()
        # a rank of an attempt that lost the run folder neither requeues the job nor writes a report into it
        fence()
        self.exit_by = time.monotonic() + HANG_EXIT_S
        threading.Thread(target=self._exit_when_due, name="gptlaunch-watchdog-exit", daemon=True).start()
        report: dict | None = None
        try:
            report = self.decide(key, seconds, used)
        except Exception as e:  # the analysis reads the run folder: a storage fault leaves this rank without one
            log.error("watchdog: no hang report (%s: %s)", type(e).__name__, e)
        requeued = False
        try:
            requeued = self.on_hang(report)
        except Exception as e:
            log.error("watchdog: ending the attempt failed (%s: %s)", type(e).__name__, e)
        self.report.best_effort(self.report.write, report)
        sys.stdout.flush()
        sys.stderr.flush()
        # Slurm stops every process of this attempt; exiting first would count as a failed task. A cut-off rank
        # does not wait: Slurm cannot reach it, and it must not outlive its attempt next to the next one.
        if requeued and self.reaches_master is not False:
            self.exit_by += REQUEUE_WAIT_S
            time.sleep(REQUEUE_WAIT_S)
        os._exit(EXIT_HANG)

    def _exit_when_due(self) -> None:
        while self.exit_by is None or time.monotonic() < self.exit_by:
            time.sleep(1.0)
        log.error("watchdog: the hang's report or requeue did not finish in time; exiting")
        os._exit(EXIT_HANG)

    def decide(self, key: str, seconds: float, used: float) -> dict | None:
        """The hang report if this rank is the one that acts (records the attempt, requeues): the one that claims
        the report first, or where nobody can claim it (the folder is unwritable), the lowest surviving rank."""
        self.report.best_effort(self.report.dump_flight_recorder)  # first: the acting rank reads every rank's dump
        if self.reaches_master is False and self._claimed_by_another():
            return None
        claimed = self.report.claim()
        if claimed is False:
            return None
        time.sleep(self.cfg.interval_s + 0.5)  # every live rank's heartbeat is fresh by now
        deadline = time.monotonic() + self.stale_s()
        others = [r for r, b in enumerate(self.peers()) if b is not None and r != self.rank]  # None: never arrived
        while not self.liveness.settled(others, self.stale_s()) and time.monotonic() < deadline:
            time.sleep(self.cfg.interval_s)  # long enough to tell a gone rank (its heartbeat stopped) from a slow one
            self.peers()
        hang = self.hang()
        if claimed is None and self.rank != acting_rank(hang, self.rank, cut_off=self.reaches_master is False):
            return None
        line = f"watchdog: {hang.summary()}; report: {self.report.text_path}"
        return {"attempt": self.attempt, "restart": self.restart, "time": time.time(), "detected_by": self.rank,
                "host": self.host, "budget": key, "budget_s": round(seconds, 3), "idle_s": round(used, 3),
                "summary": line, "report": str(self.report.text_path), "exclude": hang.hosts_to_exclude(),
                **hang.as_dict()}

    def _claimed_by_another(self) -> bool:
        """A cut-off rank leaves the report and the requeue (the scheduler may be out of its reach too) to a rank that
        is not, waiting a while for one to claim the report; it claims it itself only when none does (the master's
        host is the one lost: every rank is cut off from it)."""
        deadline = time.monotonic() + REPORTER_GRACE_S
        while time.monotonic() < deadline:
            if self.report.reported_elsewhere():
                return True
            time.sleep(self.cfg.interval_s)
        return False

    def hang(self) -> Hang:
        beats = self.peers()
        hang = Hang.from_heartbeats(beats, [self.liveness.silent_s(r) for r in range(self.world)], self.stale_s())
        try:
            stuck = stuck_in(self.report.dumps(hang.waiting + hang.behind), self.world)
            return hang.with_flight_recorder(stuck)
        except OSError as e:
            log.warning("watchdog: cannot read the flight recorder dumps: %s", e)
            return hang

    def end(self, how: str) -> None:
        """This rank is about to exit (finished, failed): the other ranks must not take it for a lost one."""
        self.ended = how
        try:
            self.beat(last=True)
        except OSError as e:  # a full disk at the end: the rank still exits with its own line and code
            self.outage.failed(e)

    def close(self) -> None:
        """The process exits now: no more beats, and this rank's beat leaves the node's memory."""
        self.node.close()

    def stale_s(self) -> float:
        """A live rank's heartbeat moves every interval_s; one that has not moved for this long is gone."""
        return max(10 * self.cfg.interval_s, SILENT_S)


def closest(progress: Progress, budget_for: Callable[[str], tuple[str, float]]) -> dict[str, float]:
    """Per budget, the largest share of it a rank has used so far: the margin against false alarms."""
    out: dict[str, float] = {}
    for kind, used in list(progress.longest.items()):
        key, seconds = budget_for(kind)
        out[key] = round(max(out.get(key, 0.0), used / seconds), 4)
    return out


def acting_rank(hang: Hang, rank: int, cut_off: bool) -> int:
    """The lowest rank not known to be gone or cut off (a rank whose heartbeat cannot be read counts: where the
    storage fails for all, every rank agrees on rank 0); `rank` is this one, `cut_off` from the master."""
    unknown = [r for r, b in enumerate(hang.beats) if b is None]
    return min(hang.surviving + unknown + ([] if cut_off else [rank]), default=rank)


def flight_recorder_env(run_dir: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """torch's NCCL flight recorder on, dumping into the run folder if NCCL itself times out, and recording when
    each collective started on the GPU (TORCH_NCCL_ENABLE_TIMING: the hang report ranks the ranks by it), unless
    the user's `environ` says otherwise."""
    timing = {} if {"TORCH_NCCL_ENABLE_TIMING", "NCCL_ENABLE_TIMING"} & set(environ) else {
        "TORCH_NCCL_ENABLE_TIMING": "1"}
    return {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": str(RunFolder(run_dir).nccl_dump_prefix), **timing}
