"""What a hang looks like from every rank's heartbeat (launch.recovery.heartbeat): who
waits in which collective at which step, who never arrived there, and whose heartbeat stopped (a dead process or host).

The heartbeats are files in the run folder, a channel that does not depend on the process group that hangs.
Torch-free: the launcher reads the reports too.

The report's files, as the watchdogs of every rank write them (launch.recovery.watchdog decides when and who acts):
    hang-<attempt>.json   claimed (created empty) by the rank that acts, then its summary record
    hang-<attempt>.txt    the summary, readable, then every rank's Python stacks, one append per rank
    flight-recorder-<attempt>-rank<R>.json  torch's flight recorders of each rank (gloo's, and NCCL's on GPUs)
<attempt> is the attempt's own id, asked when it is needed (launch.run.attempts.hang_report_name).

Every write is best effort where the storage may be what failed: the requeue is done by then, and the report is a
bonus.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from launch.recovery.flight_recorder import Stuck, as_records, read_dumps
from gpt.run_folder import RunFolder, claim

log = logging.getLogger(__name__)


def _ranks(ranks: list[int], beats: list[dict | None]) -> str:
    """'rank 1 on gl-n2' or 'ranks 0,1 on gl-n1, 2 on gl-n3'."""
    by_host: dict[str, list[int]] = {}
    for r in ranks:
        by_host.setdefault((beats[r] or {}).get("host", "an unknown host"), []).append(r)
    parts = [f"{','.join(map(str, rs))} on {host}" for host, rs in by_host.items()]
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(parts)


def doing(beat: dict) -> str:
    """What a heartbeat says its rank was doing: 'all_reduce at step 50', 'step 50', 'rendezvous'."""
    if beat.get("collective"):
        at = beat.get("step")
        where = f" at step {at}" if at is not None else ""
        context = f" ({beat['what']})" if beat["what"] != f"step {at}" else ""
        return f"{beat['collective']}{where}{context}"
    return beat["what"]


@dataclass(frozen=True)
class Hang:
    """The ranks of a hung attempt, sorted by what they did."""

    waiting: list[int]  # in the furthest collective any rank entered
    behind: list[int]  # alive, but never arrived at that collective (or in no collective at all)
    lost: list[int]  # no heartbeat for too long, or none at all this attempt
    cut: list[int]  # alive, but cannot reach the master over the network
    beats: list[dict | None]
    silent_s: tuple[float | None, ...] = ()  # per rank, how long its heartbeat has not moved (the observer's clock)
    stuck: tuple[Stuck, ...] = ()  # what the flight recorder dumps show: preferred over the heartbeats

    @classmethod
    def from_heartbeats(cls, beats: list[dict | None], silent_s: list[float | None], stale_s: float) -> Hang:
        """`silent_s` from launch.recovery.heartbeat.Liveness: a rank silent for longer than `stale_s` is gone."""
        lost = [r for r, b in enumerate(beats) if b is None or (silent_s[r] or 0.0) > stale_s]
        alive = [r for r in range(len(beats)) if r not in lost]
        in_collective = [r for r in alive if beats[r].get("collective")]
        top = max((beats[r]["seq"] for r in in_collective), default=None)
        waiting = [r for r in in_collective if beats[r]["seq"] == top]
        cut = [r for r in alive if beats[r].get("reaches_master") is False]
        return cls(waiting, [r for r in alive if r not in waiting], lost, cut, beats, tuple(silent_s))

    def with_flight_recorder(self, stuck: list[Stuck]) -> Hang:
        """The dumps' view where they have one: who waits in the stuck collective, and who never entered it. A
        rank's host thread runs ahead of its GPU, so its heartbeat may show it in a later host sync, or blame it."""
        if not stuck:
            return self
        waiting = sorted({r for s in stuck for r in s.waiting} - set(self.lost))
        alive = [r for r in range(len(self.beats)) if r not in self.lost]
        return dataclasses.replace(self, waiting=waiting, behind=[r for r in alive if r not in waiting],
                                   stuck=tuple(stuck))

    def summary(self) -> str:
        """One line: who waits in what, who never arrived, who is gone."""
        parts = []
        if self.stuck:
            parts += self._flight_recorder_parts()
        elif self.waiting:
            first = self.beats[self.waiting[0]]
            parts.append(f"{_ranks(self.waiting, self.beats)} waited {first['idle_s']:.0f} s in {doing(first)}")
        for r in ([] if self.stuck else self.behind):
            verb = "never arrived; it was in" if self.waiting else "made no progress in"
            if str(self.beats[r].get("ended")).startswith("failed"):
                verb = "saw a collective fail in"
            parts.append(f"{_ranks([r], self.beats)} {verb} {doing(self.beats[r])}")
        for r in self.lost:
            beat = self.beats[r]
            if beat is None:
                parts.append(f"rank {r} never arrived (no heartbeat this attempt: it never started, or its host "
                             "cannot write the run folder)")
            else:
                parts.append(f"{_ranks([r], self.beats)} is gone (no heartbeat for "
                             f"{self.silent_s[r] or 0.0:.0f} s; it was in {doing(beat)})")
        for r in self.cut:
            parts.append(f"{_ranks([r], self.beats)} cannot reach the master over the network (cut off)")
        if (self.lost or self.cut) and self.surviving:
            parts.append(f"surviving: {_ranks(self.surviving, self.beats)}")
        return "; ".join(parts)

    def _flight_recorder_parts(self) -> list[str]:
        """Each stuck group, the default group first, then where its missing ranks' heartbeats say they were."""
        def ranks(rs: list[int]) -> str:
            return _ranks(rs, self.beats)

        ordered = sorted(self.stuck, key=lambda s: (s.desc != "default_pg", s.group))
        parts = [f"flight recorder: {s.describe(ranks)}" for s in ordered]
        missing = sorted({r for s in self.stuck for r in s.missing if self.beats[r] and r not in self.lost})
        parts += [f"{ranks([r])} was in {doing(self.beats[r])}" for r in missing]
        return parts

    @property
    def surviving(self) -> list[int]:
        return sorted(r for r in self.waiting + self.behind if r not in self.cut)

    @property
    def stalled(self) -> list[int]:
        """Ranks whose GPU never started a collective its host enqueued while its peers' GPUs did, and that wait in
        no stuck collective themselves (a GPU waiting on another rank is that rank's doing)."""
        waiting = {r for s in self.stuck for r in s.waiting}
        return sorted({r for s in self.stuck for r in s.stalled} - waiting)

    def hosts_to_exclude(self) -> list[str]:
        """The hosts of the ranks named gone or cut off, which a requeue leaves out (never a surviving rank's), and
        those of stalled GPUs (their host's other ranks go with it: the GPU that hangs is there)."""
        keep = {(self.beats[r] or {}).get("host") for r in self.surviving}
        named = [(self.beats[r] or {}).get("host") for r in self.lost + self.cut]
        stalled = [(self.beats[r] or {}).get("host") for r in self.stalled]
        return sorted({h for h in named if h and h not in keep} | {h for h in stalled if h})

    def as_dict(self) -> dict:
        return {"waiting": self.waiting, "never_arrived": self.behind + [r for r in self.lost
                                                                         if self.beats[r] is None],
                "lost": self.lost, "cut": self.cut, "surviving": self.surviving, "ranks": self.beats,
                "flight_recorder": as_records(list(self.stuck))}


def detection_s(report: dict) -> dict[str, float]:
    """How long the hang went unseen (an attempt line's detection_s): from the last progress of the rank that saw
    it (its last heartbeat's time less the seconds it had made none: that rank's clock, as the report's time) to the
    report; a "lost node" where the report names a rank gone (no heartbeat), else a "hang"."""
    seen_by = report.get("detected_by")
    ranks = report.get("ranks") or []
    beat = ranks[seen_by] if isinstance(seen_by, int) and 0 <= seen_by < len(ranks) else None
    seconds = float(report.get("idle_s") or 0.0)
    times = (report.get("time"), *((beat or {}).get(k) for k in ("time", "idle_s")))
    if all(isinstance(t, (int, float)) for t in times):
        seconds = max(seconds, times[0] - (times[1] - times[2]))
    return {"lost node" if report.get("lost") else "hang": round(seconds, 3)}


def newest_hang(run_dir: Path, earlier: Collection[Path] = ()) -> str | None:
    """The summary line of the run's newest hang report, leaving out the `earlier` ones (there before the caller
    began to watch: a set of files, not a time, since the file server's clock is not the caller's)."""
    fresh = [p for p in RunFolder(run_dir).hang_records() if p not in earlier]
    reports = sorted(fresh, key=lambda p: p.stat().st_mtime)
    for path in reversed(reports):
        try:
            return json.loads(path.read_text()).get("summary")
        except (OSError, ValueError):  # being written
            continue
    return None



class HangReport:
    def __init__(self, run_dir: Path, attempt: Callable[[], str], rank: int, host: str, world: int,
                 interval_s: float):
        self.run_dir, self.attempt, self.rank, self.host, self.world = run_dir, attempt, rank, host, world
        self.interval_s = interval_s  # the watchdog's: how fast the other ranks add their parts

    @property
    def json_path(self) -> Path:
        return RunFolder(self.run_dir).hang_report(self.attempt())[0]

    @property
    def text_path(self) -> Path:
        return RunFolder(self.run_dir).hang_report(self.attempt())[1]

    def reported_elsewhere(self) -> bool:
        try:
            return self.json_path.is_file()
        except OSError as e:  # ESTALE, EIO: this rank's own budget still ends the attempt
            log.warning("watchdog: cannot look for a hang report: %s", e)
            return False

    def claim(self) -> bool | None:
        """Create the (empty) report: True for the first rank, False for the others, None when it cannot be."""
        try:
            if claim(self.json_path):
                return True
            if not self.json_path.is_dir():
                return False
            log.warning("watchdog: cannot write the hang report %s: it is a directory", self.json_path)
            return None
        except OSError as e:
            log.warning("watchdog: cannot write the hang report %s: %s", self.json_path, e)
            return None

    def best_effort(self, write: Callable[..., None], *args: object) -> None:
        try:
            write(*args)
        except OSError as e:  # ENOSPC, EDQUOT, EROFS, EIO: the requeue is done; the report is a bonus
            log.warning("watchdog: cannot write the hang report %s: %s", self.text_path, e)

    def write(self, report: dict | None) -> None:
        """This rank's part of the report: the summary and the JSON record if it acts, then its stacks."""
        if report is not None:
            self.best_effort(self._summarise, report)
        else:  # the summary goes first in the readable report
            deadline = time.monotonic() + 2 * self.interval_s + 5
            while self._claimed_but_empty() and time.monotonic() < deadline:
                time.sleep(0.2)
        self._append(f"\n=== rank {self.rank} on {self.host} (pid {os.getpid()}): every thread's stack ===\n"
                     + stacks())

    def _claimed_but_empty(self) -> bool:
        try:
            return self.json_path.stat().st_size == 0
        except OSError:
            return False

    def _summarise(self, report: dict) -> None:
        rows = "\n".join(f"  rank {r}: " + (json.dumps(b) if b else "no heartbeat this attempt")
                         for r, b in enumerate(report["ranks"]))
        key, seconds, used = report["budget"], report["budget_s"], report["idle_s"]
        why = f"{key}={seconds:.1f} s" if seconds else key
        self.best_effort(self._append, f"{report['summary']}\n\nrank {self.rank} on {self.host} saw no progress "
                         f"for {used:.1f} s ({why}).\nEvery rank's last heartbeat:\n{rows}\n")
        tmp = self.json_path.with_name(f".{self.json_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, self.json_path)  # last: the other ranks wait for it to add their stacks below

    def _append(self, text: str) -> None:
        """One write per part: ranks on several hosts append to the same report."""
        fd = os.open(self.text_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def dumps(self, alive: list[int]) -> dict[str, dict[int, dict]]:
        """Every rank's flight recorder dump, waiting a little for the live ranks' (each dumps as it sees the
        hang: within an interval of this rank)."""
        folder = RunFolder(self.run_dir)
        paths = {r: folder.flight_recorder(self.attempt(), r) for r in range(self.world)}
        deadline = time.monotonic() + 2 * self.interval_s + 2
        while not all(paths[r].exists() for r in alive) and time.monotonic() < deadline:
            time.sleep(0.2)
        return read_dumps({r: p for r, p in paths.items() if p.exists()})

    def dump_flight_recorder(self) -> None:
        """torch's flight recorders: the last collectives this rank's process groups saw. torch keeps two, one per
        kind of work event: gloo's (host work) and, in a CUDA build, NCCL's (device work, where a GPU run hangs);
        both are written, as JSON: the reporting rank parses data, never unpickles what a file holds."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        try:
            path = RunFolder(self.run_dir).flight_recorder(self.attempt(), self.rank)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(recorder_dumps()))
            os.replace(tmp, path)  # the reporting rank never reads half a dump
        except Exception as e:  # the dump is a bonus: the report stands without it
            log.warning("watchdog: no flight recorder dump: %s", e)


def recorder_dumps() -> dict[str, dict]:
    """Each flight recorder's dump, by the backend whose work it records."""
    from torch._C import _distributed_c10d as c10d

    out = {"gloo": json.loads(c10d._dump_fr_trace_json(includeCollectives=True, onlyActive=False))}
    if hasattr(c10d, "_dump_nccl_trace_json"):  # a build with NCCL
        out["nccl"] = json.loads(c10d._dump_nccl_trace_json(includeCollectives=True, onlyActive=False))
    return out


def stacks() -> str:
    """Every thread's Python stack, read from the interpreter (no file: /tmp may be the full file system)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = [f"Thread {ident} ({names.get(ident, '?')}):\n" + "".join(traceback.format_stack(frame))
             for ident, frame in sys._current_frames().items()]
    return "\n".join(parts)
