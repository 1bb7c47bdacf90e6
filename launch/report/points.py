"""Reading a report's run folders: config, per-rank environment and metrics, and where the ranks ran.

A point is a run folder: `config.yaml` next to `metrics/rank<R>.jsonl` (and `environment/rank<R>.json`).

Where the ranks ran decides what a point measures. Ranks of several "nodes" on one machine (cluster=local, or the
local test cluster whose nodes are network namespaces) share its cores and talk over loopback: such a point is a
*shared host*, and measures no network. A machine is known by `machine_id` (the kernel's boot id, equal in every
namespace of one machine); run folders written before it was recorded fall back to host names and the cluster.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.checkpoint.store import newest_sound, step_of
from gpt.run_folder import NOT_RUNS, AttemptLine, RunFolder, read_json_lines, read_metrics_lines
from launch.launch_config import LaunchConfig

log = logging.getLogger(__name__)


@dataclass
class PointResult:
    """A sweep point as the report reads it back from its run folder (launch.backends.Point is one to submit)."""
    path: Path
    name: str
    config: dict[str, Any]
    environments: list[dict[str, Any]]
    records: dict[int, list[dict[str, Any]]]  # rank -> train records with a step time, in step order
    train_loss: list[tuple[int, float]]       # rank 0's training loss curve, every logged step
    val_loss: list[tuple[int, float]]         # rank 0's validation losses
    overrides: list[str] | None               # Hydra's saved overrides of this point, when present
    # rank 0's newest downstream-task scores (eval.tasks): "<task>/acc" -> (step, value)
    tasks: dict[str, tuple[int, float]] = field(default_factory=dict)
    stopped_early: str = ""  # why its sweep's early stopping ended it at a rung (its newest attempt's words)
    unfinished: str = ""  # where a run that has not finished (cancelled, stopped, still running) stands: "step N of M"
    concurrent: str = ""  # the other points that ran at the same time on one of its machines (mark_concurrent)

    @property
    def ranks(self) -> int:
        if self.environments:
            return int(self.environments[0].get("world_size") or len(self.records))
        return len(self.records)

    @property
    def nodes(self) -> int:
        n = get(self.config, "nodes")
        if n is None and self.environments:
            n = self.environments[0].get("num_nodes")
        return int(n or 1)

    @property
    def hosts(self) -> list[str]:
        by_rank = {int(e["rank"]): str(e.get("host", "?")) for e in self.environments if "rank" in e}
        for rank, recs in self.records.items():
            if rank not in by_rank and recs:
                by_rank[rank] = str(recs[0].get("host", "?"))
        return [by_rank.get(r, "?") for r in range(self.ranks)]

    @property
    def machines(self) -> list[str]:
        """Each rank's machine: its machine id where recorded, else its host name."""
        ids = {int(e["rank"]): e.get("machine_id") for e in self.environments if "rank" in e}
        return [str(ids.get(r) or h) for r, h in enumerate(self.hosts)]

    @property
    def shared_host(self) -> str:
        """Why this point's ranks shared a machine, with each other or with another point's ('' when they did not)."""
        return "; ".join(why for why in (self._nodes_on_one_machine(), self.concurrent) if why)

    def _nodes_on_one_machine(self) -> str:
        if self.nodes < 2:
            return ""
        machines = len(set(self.machines))
        if get(self.config, "cluster.name") == "local":
            return f"cluster=local: {self.nodes} nodes are groups of processes on one machine"
        if machines < self.nodes:
            hosts = ", ".join(sorted(set(self.hosts)))
            return f"{self.nodes} nodes ({hosts}) on {machines} machine(s)"
        return ""

    @property
    def threads(self) -> int | None:
        values = [e.get("threads") for e in self.environments]
        return max(values) if values and all(isinstance(v, int) for v in values) else None

    @property
    def cores_per_rank(self) -> float | None:
        """CPU cores each rank computes with (the smallest share over ranks); None on GPUs or when not recorded.

        A core that n ranks of one machine may run on counts 1/n for each; a rank uses at most its threads."""
        envs = self.environments
        if not envs or any(e.get("gpu") or not e.get("cpu_count") for e in envs):
            return None
        cpus = [set(e.get("cpu_affinity") or range(int(e["cpu_count"]))) for e in envs]
        users = Counter((m, c) for m, cs in zip(self.machines, cpus) for c in cs)
        shares = []
        for e, m, cs in zip(envs, self.machines, cpus):
            share = sum(1 / users[(m, c)] for c in cs)
            shares.append(min(share, e["threads"]) if isinstance(e.get("threads"), int) else share)
        return min(shares)

    @property
    def oversubscribed(self) -> str:
        """'N ranks x T threads on C cores' when the ranks of one machine ask for more threads than it has."""
        envs = [e for e in self.environments if isinstance(e.get("threads"), int) and e.get("cpu_count")]
        if len(envs) != len(self.environments) or not envs:
            return ""
        by_machine = Counter(m for m in self.machines)
        machine, ranks = by_machine.most_common(1)[0]
        env = next(e for e, m in zip(envs, self.machines) if m == machine)
        if ranks * env["threads"] > env["cpu_count"]:
            return f"{ranks} ranks x {env['threads']} threads on {env['cpu_count']} cores"
        return ""


def _windows(point: PointResult) -> Iterable[tuple[str, str, float, float]]:
    """(machine, host, start, end) of each rank's logged windows. A window ends at its record's `time` and starts at
    the rank's previous record, or where its attempt started (`time - elapsed_s`) when that is later: a requeued
    run's gap between attempts is no window. Records without times (older run folders) give none."""
    machines = point.machines
    for rank, records in point.records.items():
        previous = -math.inf
        for r in records:
            end, elapsed = r.get("time"), r.get("elapsed_s")
            if not isinstance(end, (int, float)) or not isinstance(elapsed, (int, float)):
                continue
            start = max(end - elapsed, previous) if previous <= end else end - elapsed
            yield machines[rank] if rank < len(machines) else str(r.get("host")), str(r.get("host")), start, end
            previous = end


def mark_concurrent(points: Sequence[PointResult]) -> None:
    """Set `concurrent` on the points whose windows overlapped in time with another point's on a common machine (a
    scheduler that lets jobs share nodes, such as the local test cluster, runs a sweep's points at once): they
    shared its cores, so they measure the other job's load as much as their own."""
    windows = sorted((start, end, machine, host, i) for i, p in enumerate(points)
                     for machine, host, start, end in _windows(p))
    met: dict[int, tuple[set[str], set[str]]] = {}  # point -> (the other points' names, its hosts they met on)
    active: list[tuple[float, float, str, str, int]] = []
    for window in windows:
        start, _, machine, host, i = window
        active = [a for a in active if a[1] > start]  # still running when this window starts
        for _, _, other_machine, other_host, j in active:
            if other_machine == machine and j != i:
                for me, them, where in ((i, j, host), (j, i, other_host)):
                    names, hosts = met.setdefault(me, (set(), set()))
                    names.add(points[them].name)
                    hosts.add(where)
        active.append(window)
    for i, (names, hosts) in met.items():
        others = few(f"`{n}`" for n in sorted(names))
        points[i].concurrent = f"ran at the same time as {others} on the machine of {few(sorted(hosts))}"


def few(items: Iterable[str], most: int = 3) -> str:
    """At most `most` of them, then how many more: a packed sweep of 100 points on one node names no 99 each."""
    items = list(items)
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def get(d: dict[str, Any], dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    # already resolved when written; keys moved since read where they now are
    saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return LaunchConfig.moved_in_place(saved) if isinstance(saved, dict) else saved


def find_run_folders(root: Path, max_depth: int = 4) -> list[Path]:
    """The run folders at or under root (a run folder's own subfolders are not searched)."""
    if RunFolder(root).is_run():
        return [root]
    found: list[Path] = []
    if max_depth == 0:
        return found
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if child.name in NOT_RUNS or child.name.startswith("."):
            continue
        found.extend(find_run_folders(child, max_depth - 1))
    return found




def _newest_per_step(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """A requeued job appends to the same file: keep the newest record of each step, in step order."""
    by_step = {r["step"]: r for r in records if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def _environments(path: Path) -> list[dict[str, Any]]:
    envs = []
    for f in RunFolder(path).environment_records():
        try:
            envs.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping %s: %s", f, e)
    return sorted(envs, key=lambda e: int(e.get("rank", 0)))


def _task_scores(records: list[dict[str, Any]]) -> dict[str, tuple[int, float]]:
    """Each task's newest score and its step, from records in step order."""
    return {k.removeprefix("tasks/"): (r["step"], v) for r in records for k, v in r.items()
            if k.startswith("tasks/") and isinstance(v, (int, float))}


def _with_eval_jobs(folder: RunFolder, val_loss: list[tuple[int, float]], tasks: dict[str, tuple[int, float]]):
    """The figures of the checkpoints' evaluation jobs (eval.after_save=job) beside the training's own: a step's
    validation loss the training measured is kept, and each task's newest score is whichever is newer."""
    jobs = _newest_per_step(r for r in read_json_lines(folder.eval_jobs_metrics) if isinstance(r, dict))
    measured = {step for step, _ in val_loss}
    val_loss = sorted(val_loss + [(r["step"], r["val_loss"]) for r in jobs
                                  if r["step"] not in measured and isinstance(r.get("val_loss"), (int, float))])
    newer = {k: v for k, v in _task_scores(jobs).items() if k not in tasks or v[0] > tasks[k][0]}
    return val_loss, {**tasks, **newer}


def load_point(path: Path, root: Path) -> PointResult:
    records: dict[int, list[dict[str, Any]]] = {}
    train_loss: list[tuple[int, float]] = []
    val_loss: list[tuple[int, float]] = []
    tasks: dict[str, tuple[int, float]] = {}
    folder = RunFolder(path)
    for f in folder.metrics_files():
        rank = int(f.stem.removeprefix("rank"))
        recs = [r for r in read_metrics_lines(f) if isinstance(r, dict)]  # a line cut short by a kill is skipped
        train = _newest_per_step(r for r in recs if r.get("kind") == "train")
        records[rank] = [r for r in train if r.get("step_time_s") is not None]
        if rank == 0:
            train_loss = [(r["step"], r["loss"]) for r in train if isinstance(r.get("loss"), (int, float))]
            val = _newest_per_step(r for r in recs if r.get("kind") == "val")
            val_loss = [(r["step"], r["loss"]) for r in val if isinstance(r.get("loss"), (int, float))]
            tasks = _task_scores(val)
    val_loss, tasks = _with_eval_jobs(folder, val_loss, tasks)
    overrides_file = folder.hydra_overrides
    overrides = [str(o) for o in load_yaml(overrides_file)] if overrides_file.is_file() else None
    name = str(path.relative_to(root)) if path != root else path.name
    attempts = folder.attempts.read()
    early = AttemptLine.stopped_early_why(attempts)
    config = load_yaml(folder.config)
    return PointResult(path, name, config, _environments(path), records, train_loss, val_loss, overrides, tasks, early,
                       "" if early else _unfinished(folder, config, train_loss, attempts))


def _unfinished(folder: RunFolder, config: dict[str, Any], train_loss: list[tuple[int, float]],
                attempts: list) -> str:
    """'step N of M' for a run short of its train.max_steps without the summary a finished run writes, with how its
    last attempt ended where it failed or diverged (the same command would not simply go on); else ''. N: its newest
    checkpoint's step or its last logged one, the later (a stop saves between log steps)."""
    found, _ = newest_sound(folder.checkpoints)
    last = max(train_loss[-1][0] if train_loss else 0, step_of(found) if found else 0)
    planned = get(config, "train.max_steps")
    if not isinstance(planned, int) or last >= planned or folder.read_summary() is not None:
        return ""
    ended = attempts[-1].ended if attempts else ""
    how = next((f" ({w})" for w in ("diverged", "failed") if ended.startswith(w)), "")
    return f"step {last} of {planned}{how}"
