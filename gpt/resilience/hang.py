"""What a hang looks like from every rank's heartbeat (gpt.resilience.heartbeat): who
waits in which collective at which step, who never arrived there, and whose heartbeat stopped (a dead process or host).

The heartbeats are files in the run folder, a channel that does not depend on the process group that hangs.
Torch-free: the launcher reads the reports too.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from collections.abc import Collection
from pathlib import Path

from gpt.resilience.flight_recorder import Stuck, as_records
from gpt.run_folder import RunFolder


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
        """`silent_s` from gpt.resilience.heartbeat.Liveness: a rank silent for longer than `stale_s` is gone."""
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
