"""What a hang looks like from every rank's heartbeat (RUN_DIR/watchdog/rank<R>.json, gpt.watchdog): who waits in
which collective at which step, who never arrived there, and whose heartbeat stopped (a dead process or host).

The heartbeats are files in the run folder, a channel that does not depend on the process group that hangs.
Torch-free: the launcher reads the reports too.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return run_dir / "watchdog" / f"rank{rank}.json"


def write_heartbeat(run_dir: Path, rank: int, record: dict) -> None:
    path = heartbeat_path(run_dir, rank)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # a reader never sees half a heartbeat


def end_heartbeat(run_dir: Path, rank: int, how: str) -> None:
    """Mark a rank that cannot say so itself (its process is gone) as ended: its peers leave the attempt alone."""
    try:
        beat = json.loads(heartbeat_path(run_dir, rank).read_text())
    except (OSError, ValueError):
        return
    write_heartbeat(run_dir, rank, {**beat, "ended": how, "time": time.time()})


def read_heartbeats(run_dir: Path, world: int, attempt: int) -> list[dict | None]:
    """Every rank's last heartbeat of this attempt (None: it wrote none)."""
    out: list[dict | None] = []
    for rank in range(world):
        try:
            beat = json.loads(heartbeat_path(run_dir, rank).read_text())
        except (OSError, ValueError):
            beat = None
        out.append(beat if beat is not None and beat.get("attempt") == attempt else None)
    return out


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

    @classmethod
    def from_heartbeats(cls, beats: list[dict | None], stale_s: float, now: float | None = None) -> Hang:
        now = time.time() if now is None else now
        lost = [r for r, b in enumerate(beats) if b is None or now - b["time"] > stale_s]
        alive = [r for r in range(len(beats)) if r not in lost]
        in_collective = [r for r in alive if beats[r].get("collective")]
        top = max((beats[r]["seq"] for r in in_collective), default=None)
        waiting = [r for r in in_collective if beats[r]["seq"] == top]
        cut = [r for r in alive if beats[r].get("reaches_master") is False]
        return cls(waiting, [r for r in alive if r not in waiting], lost, cut, beats)

    def summary(self) -> str:
        """One line: who waits in what, who never arrived, who is gone."""
        parts = []
        if self.waiting:
            first = self.beats[self.waiting[0]]
            parts.append(f"{_ranks(self.waiting, self.beats)} waited {first['idle_s']:.0f} s in {doing(first)}")
        for r in self.behind:
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
                             f"{time.time() - beat['time']:.0f} s; it was in {doing(beat)})")
        for r in self.cut:
            parts.append(f"{_ranks([r], self.beats)} cannot reach the master over the network (cut off)")
        if (self.lost or self.cut) and self.surviving:
            parts.append(f"surviving: {_ranks(self.surviving, self.beats)}")
        return "; ".join(parts)

    @property
    def surviving(self) -> list[int]:
        return sorted(r for r in self.waiting + self.behind if r not in self.cut)

    def as_dict(self) -> dict:
        return {"waiting": self.waiting, "never_arrived": self.behind + [r for r in self.lost
                                                                         if self.beats[r] is None],
                "lost": self.lost, "cut": self.cut, "surviving": self.surviving, "ranks": self.beats}


def newest_hang(run_dir: Path, since: float = 0.0) -> str | None:
    """The summary line of the run's newest hang report written after `since` (epoch seconds), if any."""
    reports = sorted(run_dir.glob("hang-*.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(reports):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):  # being written
            continue
        if report.get("time", 0) >= since:
            return report.get("summary")
    return None
