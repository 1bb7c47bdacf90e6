"""Every rank's heartbeat: in steady state through its node's record, RUN_DIR/watchdog/node-<host>.json (written in
place by one rank per node, launch.recovery.node_heartbeat); when a rank ends or vanishes, in a file of its own,
RUN_DIR/watchdog/rank<R>.json. Read by the peers' watchdogs and by the launcher. Files in the run folder are a
channel that does not depend on the process group that may hang. Torch-free.

A heartbeat carries a sequence number (`beat`, one more per write) and the job's restart count; of a rank's records
the one with the highest pair is its heartbeat. Whether its rank is alive is judged by Liveness on the reader's own
monotonic clock (did the pair change lately?), never by the record's wall-clock time or the file's mtime: those come
from another host's clock or the file server's.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpt.resilience.lease import fence, fenced_generation
from gpt.run_folder import RunFolder, write_json

log = logging.getLogger(__name__)
RANK_FILE = re.compile(r"rank(\d+)\.json")  # a rank's own file; what else a user leaves there is not one
NODE_FILE = re.compile(r"node-.+\.json")
_said: set[str] = set()  # the stray files this process named already


def write_heartbeat(run_dir: Path, rank: int, record: dict) -> None:
    fence()  # a rank of an attempt that lost the run folder (an orphan, a frozen process woken) stops here
    path = RunFolder(run_dir).heartbeat(rank)
    record = {**record, "generation": fenced_generation()}  # which attempt's rank: an orphan's differs
    write_json(path, record)  # the watchdog thread beats while the main thread ends it: one temporary file each


def end_heartbeat(run_dir: Path, rank: int, how: str, **extra: object) -> None:
    """Mark a rank that cannot say so itself (its process is gone) as ended: its peers leave the attempt alone."""
    beat = all_heartbeats(run_dir).get(rank)
    if beat is None:
        return
    write_heartbeat(run_dir, rank, {**beat, **extra, "ended": how, "beat": beat.get("beat", 0) + 1,
                                    "time": time.time()})


def read_heartbeats(run_dir: Path, world: int, attempt: int, restart: int | None = None) -> list[dict | None]:
    """Every rank's last heartbeat of this attempt (None: it wrote none, or it cannot be read now). With `restart`,
    only that restart's: an orphan of an earlier restart (a rank on a cut-off node) writes the same attempt number."""
    mine = fenced_generation()
    found = all_heartbeats(run_dir, lambda beat: of_attempt(beat, attempt, restart, mine))
    return [found.get(rank) for rank in range(world)]


def of_attempt(beat: dict, attempt: int, restart: int | None, generation: int | None) -> bool:
    """Whether `beat` is of that attempt (and restart, unless None) and generation. A beat from before its rank's
    fence carries no generation yet: it is of every generation of its attempt (the node's writer, still unfenced,
    must not drop a fenced peer's only beat: a rank that died right after its fence could not be named lost)."""
    theirs = beat.get("generation")
    return (beat.get("attempt") == attempt and restart in (None, beat.get("restart"))
            and (None in (theirs, generation) or theirs == generation))


def all_heartbeats(run_dir: Path, keep: Callable[[dict], bool] = lambda beat: True) -> dict[int, dict]:
    """Rank -> its newest heartbeat that `keep` accepts, from the node records and the ranks' own files."""
    watchdog, out = RunFolder(run_dir).watchdog, {}
    try:
        paths = sorted(watchdog.iterdir())
    except OSError:
        return {}
    for path in paths:
        for rank, beat in _beats_in(path).items():
            if keep(beat) and _newer(beat, out.get(rank)):
                out[rank] = beat
    return out


def _beats_in(path: Path) -> dict[int, dict]:
    """The heartbeats a file of the watchdog folder holds, by rank: a node's record, or a rank's own file. A file a
    user copied there (`rank0-copy.json`) or one that is not a record (`node-x.json` holding a list) is skipped, named
    once: the peers read this folder when a rank is stuck, exactly when a crash would hold the allocation."""
    own = RANK_FILE.fullmatch(path.name)
    if not (own or NODE_FILE.fullmatch(path.name)):
        return {}
    record = _read(path)
    if record is None:  # unreadable now (being rewritten, or the storage fails): the next look reads it
        return {}
    try:
        beats = {int(own[1]): record} if own else {int(r): b for r, b in record["ranks"].items()}
        if all(isinstance(b, dict) and _order(b) for b in beats.values()):
            return beats
    except (AttributeError, KeyError, TypeError, ValueError):
        pass
    if path.name not in _said:
        _said.add(path.name)
        log.warning("%s is not a heartbeat record: left alone, not read", path)
    return {}


def _newer(beat: dict, than: dict | None) -> bool:
    return than is None or _order(beat) > _order(than)


def _order(beat: dict) -> tuple[int, int]:
    return int(beat.get("restart", 0)), int(beat.get("beat", 0))


def _read(path: Path, tries: int = 3) -> dict | None:
    """A record, or None; a node record is rewritten in place, so a read that meets a write is tried again."""
    for _ in range(tries):
        try:
            return json.loads(path.read_text())
        except ValueError:
            time.sleep(0.01)
        except OSError:
            return None
    return None


@dataclass
class Liveness:
    """When (on this process's time.monotonic()) each rank's heartbeat last moved: a new (restart, beat) pair. A
    rank first seen now counts from now, so an observer calls a peer silent only after watching it that long."""

    moved: dict[int, tuple[tuple[int, int], float]] = field(default_factory=dict)
    since: float | None = None  # when this observer began watching

    def observe(self, beats: list[dict | None], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.since = now if self.since is None else self.since
        for rank, beat in enumerate(beats):
            if beat is None:
                continue
            key = (int(beat.get("restart", 0)), int(beat.get("beat", 0)))
            if rank not in self.moved or self.moved[rank][0] != key:
                self.moved[rank] = (key, now)

    def settled(self, ranks: list[int], stale_s: float, now: float | None = None) -> bool:
        """Whether each of `ranks` is known either way: its heartbeat moved since this observer began watching, or
        the observer has watched for `stale_s` (long enough to call a silent one gone)."""
        moved = all(r in self.moved and self.moved[r][1] > (self.since or 0.0) for r in ranks)
        return moved or self.watched_s(now) >= stale_s

    def watched_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return 0.0 if self.since is None else now - self.since

    def silent_s(self, rank: int, now: float | None = None) -> float | None:
        """Seconds since that rank's heartbeat last moved (None: never seen)."""
        now = time.monotonic() if now is None else now
        return now - self.moved[rank][1] if rank in self.moved else None
