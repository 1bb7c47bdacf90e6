"""torch's flight recorder, read after a hang: which ranks never entered the collective the others wait in.

Each rank's process groups record their last collectives in a ring buffer (torch.distributed's flight recorder:
TORCH_FR_BUFFER_SIZE entries, on by default for NCCL and gloo in torch 2.13). torch keeps one recorder per kind of
work event: gloo's (`_dump_fr_trace_json`) and NCCL's (`_dump_nccl_trace_json`, CUDA builds only); the watchdog
dumps both from every rank, as JSON, when a hang ends the attempt, and each is read on its own. The dump's schema
(torch/csrc/distributed/c10d/FlightRecorderDetail.hpp, version 2.10): `pg_status`, per process group id, the
sequence numbers of its last collective enqueued, started and completed; `entries`, each with `pg_id`,
`process_group` (name, description), `collective_seq_id`, `profiling_name` ("nccl:all_reduce"), `state`
("scheduled", "started", "completed") and `time_discovered_started_ns`; `pg_config`, per group name, its global
`ranks`.

On GPUs this is the evidence, not the heartbeats: a rank's host thread enqueues a collective and runs on, so a
host-side view can blame a healthy rank that is blocked in a later host sync while its GPU waits for a peer. Every host
enqueues ahead of its GPU, so on NCCL the count that tells is the collectives each GPU *started*, which NCCL knows
only with TORCH_NCCL_ENABLE_TIMING=1 (set for GPU ranks: launch.recovery.watchdog.flight_recorder_env; without it
`last_started_collective` stays -1 and no entry is "started"). The group's stuck collective is then the newest one
any member's GPU started and some member has not completed; the members whose GPU started less never entered it, and
of those, the ones whose host enqueued it have a device that stalled. Where a dump carries no start (gloo records
none: its work runs on the host), the stuck collective is the newest one any member enqueued, and the members that
enqueued less never entered it. Torch-free, and JSON only: a file in the run folder is never unpickled."""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable


def _numbers(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


@dataclass(frozen=True)
class Stuck:
    """A process group's collective that some of its members wait in and others never entered."""

    group: str  # the group's name ("0" is the default group)
    desc: str  # its description ("default_pg", or what the code that made it called it)
    seq: int  # the collective's sequence number in that group
    op: str  # what it is, as torch names it: "nccl:all_reduce"
    waiting: tuple[int, ...]  # entered it and have not completed it
    missing: tuple[int, ...]  # never entered it (the ranks to look at)
    no_dump: tuple[int, ...]  # members whose dump is missing (their process is gone, or never dumped)
    stalled: tuple[int, ...] = ()  # of `missing`, those whose host enqueued it and whose GPU never started it

    def describe(self, ranks: Callable[[list[int]], str] = _numbers) -> str:
        """`ranks` names a list of ranks ("rank 1 on gl-n2")."""
        text = f"{self.op} #{self.seq} of group {self.group} ({self.desc})"
        never = [r for r in self.missing if r not in self.stalled]
        parts = [f"{ranks(never)} never entered {text}"] if never else []
        if self.stalled:
            parts.append(f"{ranks(list(self.stalled))} never started {'it' if never else text} on its GPU (its host "
                         "enqueued it)")
        parts = parts or [f"{text} is stuck"]
        if self.waiting:
            parts.append(f"{ranks(list(self.waiting))} {'waits' if len(self.waiting) == 1 else 'wait'} in it")
        if self.no_dump:
            parts.append(f"no dump from {ranks(list(self.no_dump))}")
        return ", ".join(parts)


def read_dumps(paths: dict[int, Path]) -> dict[str, dict[int, dict]]:
    """Each recorder's dumps that can be read, by recorder ("gloo", "nccl") and rank (a dump cut short by a dying
    process, or a file that is not a dump, is left out)."""
    out: dict[str, dict[int, dict]] = {}
    for rank, path in paths.items():
        try:
            recorders = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        for name, dump in recorders.items() if isinstance(recorders, dict) else ():
            if isinstance(dump, dict) and isinstance(dump.get("pg_status"), dict):
                out.setdefault(name, {})[rank] = dump
    return out


@dataclass(frozen=True)
class _Group:
    name: str
    desc: str
    enqueued: int
    completed: int
    started: int | None  # the newest collective its GPU started; None: the dump records no start (gloo, no timing)


def _groups(dump: dict) -> dict[str, _Group]:
    """A rank's process groups, by name: pg_status is keyed by the id this process gave the group, the entries
    tell which name (the same on every rank) that id has."""
    names: dict[str, tuple[str, str]] = {}
    started: dict[str, int] = {}  # per pg id, the newest entry whose start was seen (the dump updates entries last)
    for e in dump.get("entries", []):
        if not e.get("is_p2p"):
            pg_id = str(e["pg_id"])
            names[pg_id] = tuple(e["process_group"])
            if e.get("time_discovered_started_ns") or e.get("state") == "started":
                started[pg_id] = max(started.get(pg_id, -1), int(e["collective_seq_id"]))
    out = {}
    for pg_id, status in dump["pg_status"].items():
        if pg_id in names:
            name, desc = names[pg_id]
            start = max(int(status.get("last_started_collective", -1)), started.get(pg_id, -1))
            out[name] = _Group(name, desc, int(status["last_enqueued_collective"]),
                               int(status["last_completed_collective"]), start if start >= 0 else None)
    return out


def _members(name: str, desc: str, dumps: dict[int, dict], seen: set[int], world: int) -> set[int]:
    for dump in dumps.values():
        config = dump.get("pg_config", {}).get(name)
        if config:
            ranks = config["ranks"]
            return set(ast.literal_eval(ranks) if isinstance(ranks, str) else ranks)
    return set(range(world)) if desc == "default_pg" else seen


def _op(dumps: dict[int, dict], ranks: tuple[int, ...], name: str, seq: int) -> str:
    for rank in ranks:
        for e in dumps[rank].get("entries", []):
            if tuple(e["process_group"])[0] == name and e.get("collective_seq_id") == seq and not e.get("is_p2p"):
                return str(e.get("profiling_name") or "a collective")
    return "a collective"


def _stuck(have: dict[int, _Group], by: Callable[[_Group], int]) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """The newest collective any member reached by `by` (enqueued, or started on its GPU) that some member has not
    completed: (its number, who reached it and waits, who did not reach it); number 0 when there is none."""
    top = max(by(g) for g in have.values())
    if top <= 0 or all(g.completed >= top for g in have.values()):
        return 0, (), ()
    waiting = tuple(sorted(r for r, g in have.items() if by(g) == top and g.completed < top))
    return top, waiting, tuple(sorted(r for r, g in have.items() if by(g) < top))


def stuck_collectives(dumps: dict[int, dict], world: int) -> list[Stuck]:
    """Every process group whose newest collective some member has not completed, with who never entered it: by
    the collectives each member's GPU started where every dump of the group records starts (NCCL with timing), else
    by the collectives each member enqueued."""
    per_rank = {rank: _groups(dump) for rank, dump in dumps.items()}
    names = sorted({name for groups in per_rank.values() for name in groups})
    out = []
    for name in names:
        have = {r: g[name] for r, g in per_rank.items() if name in g}
        desc = next(iter(have.values())).desc
        top, waiting, missing = 0, (), ()
        if all(g.started is not None for g in have.values()):
            top, waiting, missing = _stuck(have, lambda g: max(g.started, g.completed))
        if not top:  # no start recorded, or no GPU started the collective its host waits on
            top, waiting, missing = _stuck(have, lambda g: g.enqueued)
        if not top:
            continue
        stalled = tuple(r for r in missing if have[r].enqueued >= top)
        members = _members(name, desc, dumps, set(have), world)
        out.append(Stuck(name, desc, top, _op(dumps, waiting, name, top), waiting, missing,
                         tuple(sorted(members - set(have))), stalled))
    return out


def stuck_in(recorders: dict[str, dict[int, dict]], world: int) -> list[Stuck]:
    """stuck_collectives of each recorder: NCCL's device work first (where a GPU run hangs), then gloo's host work."""
    return [s for name in sorted(recorders, key=lambda n: n != "nccl")
            for s in stuck_collectives(recorders[name], world)]


def as_records(stuck: list[Stuck]) -> list[dict[str, Any]]:
    return [{"group": s.group, "desc": s.desc, "seq": s.seq, "op": s.op, "waiting": list(s.waiting),
             "missing": list(s.missing), "no_dump": list(s.no_dump), "stalled": list(s.stalled)} for s in stuck]
