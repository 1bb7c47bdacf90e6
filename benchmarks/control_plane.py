"""What the control plane costs the shared file system and the scheduler, measured at several sizes, fitted, and
projected to 128, 1,024 and 4,096 nodes x 8 ranks beside the budgets of DESIGN.md ("the control plane is light").

    python benchmarks/control_plane.py                               # local ranks: 1, 2 and 4 nodes x 2 ranks
    python benchmarks/control_plane.py --slurm-nodes 1 2 4 8 --sweep-points 4 16 --faults
                                  # also on the local Slurm cluster (GPTLAUNCH_CLUSTER_INSTANCE; `up N` first)

Per size, a tiny run of a few hundred steps with one checkpoint in the middle, its run folder watched:
- file-system metadata operations (tests/control_counters.py FsOps: creates, opens, renames, unlinks, attribute
  changes; stat and failed lookups are invisible to inotify and not counted) per second in steady state (the
  window between the first and last train records, checkpoint files left out), per node and per job; the
  operations of one checkpoint save; the bytes the run folder holds at the end (metrics, checkpoints, the rest);
- Slurm client calls (SlurmCalls: PATH shims that the job inherits) per minute in steady state, from the ranks and
  from the login-node launcher, and squeue calls per poll of the waiter for a sweep of P points;
- the rendezvous time from the attempts log's start-up breakdown (`startup.rendezvous_s`);
- with --faults, on Slurm: a requeue (debug.signal_at_step) and a hang (debug.hang_rank with a short watchdog):
  the Slurm calls and the processes that made them.
Each cost is fitted against the size (numpy: a + b*n and a + b*log2(n), the smaller residual wins) and projected.
Writes benchmarks/results/control_plane.json. Not a test: it runs on demand (minutes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.common import REPO, SHARED_TEXT, save_results  # noqa: E402
from control_counters import FsOps, SlurmCalls  # noqa: E402

TINY = ["model=tiny", "strategy=ddp", "train.warmup_steps=1", "train.log_interval=10", "train.eval_interval=0",
        "train.progress=false", "train.layer_grad_norms=false"]
PROJECT_NODES = (128, 1024, 4096)
RANKS_PER_NODE = 8
# DESIGN.md: about one metadata operation per node per second, one Slurm call per job per minute in steady state,
# one squeue per poll for a whole sweep, rendezvous and preflight at most logarithmic in the ranks.
BUDGETS = {"fs_ops_per_node_s": 1.0, "slurm_calls_per_job_min": 1.0, "squeue_per_poll": 1.0}


@dataclass
class Measured:
    where: str  # local or slurm
    nodes: int
    ranks: int
    steady_s: float
    fs_ops_per_s: float
    fs_ops_by_kind: dict[str, int]
    fs_ops_by_file: dict[str, int]  # steady state, rank numbers folded: metrics/rank#.jsonl
    checkpoint_ops: int
    bytes: dict[str, int]
    rank_slurm_calls_per_min: float
    launcher_slurm_calls_per_min: float
    rendezvous_s: float | None
    calls: dict[str, int] = field(default_factory=dict)


def data_overrides(tmp: Path) -> list[str]:
    text = REPO / "data" / "tinyshakespeare" / "input.txt"
    return [f"data.text_path={text if text.exists() else SHARED_TEXT}", f"data.dir={tmp / 'data'}"]


def slurm_env() -> dict[str, str]:
    out = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "env"], capture_output=True, text=True,
                         check=True).stdout
    env = dict(os.environ)
    env["SLURM_CONF"] = next(x.split("=", 1)[1].strip("'\"") for x in out.splitlines() if "SLURM_CONF=" in x)
    env["PATH"] = f"{REPO / 'slurm' / 'bin'}:{Path(sys.executable).parent}:{env['PATH']}"
    return env


def folder_bytes(run_dir: Path) -> dict[str, int]:
    out: Counter[str] = Counter()
    for f in run_dir.rglob("*"):
        if f.is_file():
            top = f.relative_to(run_dir).parts[0]
            out[top if top in ("metrics", "checkpoints", "tensorboard") else "other"] += f.stat().st_size
    return dict(out)


def train_times(run_dir: Path) -> list[float]:
    times = []
    for line in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            times.append(r["time"])
    return times


def rendezvous_s(run_dir: Path) -> float | None:
    for line in (run_dir / "attempts.jsonl").read_text().splitlines()[::-1]:
        value = (json.loads(line).get("startup") or {}).get("rendezvous_s")
        if value is not None:
            return value
    return None


def run_once(where: str, nodes: int, tasks: int, steps: int, step_s: float, env: dict[str, str],
             tmp: Path) -> Measured:
    """One tiny run with a checkpoint half way, its run folder and its Slurm calls counted. Rank 0 sleeps `step_s`
    a step (every rank waits for it): a logging rate like a real model's, not the tiny model's hundreds of steps/s."""
    run_dir = tmp / f"{where}-{nodes}"
    calls = SlurmCalls(tmp / f"shims-{where}-{nodes}") if where == "slurm" else None
    env = calls.env(env) if calls else env
    extra = ["cluster=slurm", "cluster.time_min=15", "hydra.launcher.poll_s=1"] if where == "slurm" else []
    cmd = [sys.executable, "-m", "launch", f"nodes={nodes}", f"cluster.tasks_per_node={tasks}", *TINY, *extra,
           f"train.global_batch_size={2 * nodes * tasks}", f"train.max_steps={steps}", "debug.delay_rank=0",
           f"debug.delay_s={step_s}", f"checkpoint.interval_steps={steps // 2}", *data_overrides(tmp),
           f"hydra.run.dir={run_dir}"]
    run_dir.mkdir(parents=True)
    with FsOps(run_dir) as ops:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"{where} nodes={nodes} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    times = train_times(run_dir)
    since, until = times[1], times[-1]  # the first record's window includes start-up
    steady = [o for o in ops.window(since, until) if not o.path.startswith("checkpoints")]
    by_proc = Counter()
    rank_calls, launcher_calls = 0, 0
    if calls:
        login = os.uname().nodename
        for c in calls.calls(since, until):
            by_proc[f"{c.host}:{c.command}"] += 1
            rank_calls += c.host != login
            launcher_calls += c.host == login
    span = max(until - since, 1e-9)
    return Measured(where, nodes, nodes * tasks, round(span, 2), len(steady) / span,
                    dict(Counter(o.kind for o in steady)),
                    dict(Counter(re.sub(r"\d+", "#", o.path) for o in steady).most_common(8)),
                    sum(o.path.startswith("checkpoints") for o in ops.ops), folder_bytes(run_dir),
                    60 * rank_calls / span, 60 * launcher_calls / span, rendezvous_s(run_dir), dict(by_proc))


def sweep_polls(points: int, env: dict[str, str], tmp: Path) -> dict[str, float]:
    """A sweep of `points` one-node points (one job array): the waiter's squeue calls per poll, from the launcher's
    own calls (each poll runs squeue once; scontrol only for a job squeue no longer lists)."""
    calls = SlurmCalls(tmp / f"shims-sweep-{points}")
    sweep = tmp / f"sweep-{points}"
    cmd = [sys.executable, "-m", "launch", "-m", f"seed=range(0,{points})", "nodes=1", "cluster=slurm",
           "cluster.time_min=15", f"budget.max_node_hours={3 * points}", "hydra.launcher.progress=false",
           "hydra.launcher.poll_s=1", *TINY, "train.max_steps=2", "checkpoint.interval_steps=0",
           *data_overrides(tmp), f"hydra.sweep.dir={sweep}"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=calls.env(env), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"sweep of {points} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    login = os.uname().nodename
    mine = [c for c in calls.calls() if c.host == login]
    sbatch = [c.time for c in mine if c.command == "sbatch"]
    polls = [c for c in mine if c.command == "squeue" and c.time > max(sbatch)]
    # the waiter polls every poll_s; a poll is squeue plus whatever follows it within the same second
    per_poll = len(polls) / max(len({round(c.time) for c in polls}), 1)
    return {"points": points, "submitted_s": round(max(sbatch) - start, 2), "sbatch_calls": len(sbatch),
            "squeue_calls": len(polls), "squeue_per_poll": round(per_poll, 2),
            "calls": dict(Counter(c.command for c in mine)), "total_s": round(time.time() - start, 1)}


def faults(nodes: int, env: dict[str, str], tmp: Path) -> dict[str, dict[str, int]]:
    """A requeue and a hang on Slurm: the processes and nodes of the attempt that ended that called scontrol (the
    budget: one per job), and the calls of the attempts after it."""
    out = {}
    for name, extra in (("requeue", ["debug.signal_at_step=20", "preemption.max_restarts=2"]),
                        ("hang", [f"debug.hang_rank={nodes - 1}", "debug.hang_step=20", "watchdog.step_s=5",
                                  "preemption.max_restarts=2"])):
        calls = SlurmCalls(tmp / f"shims-{name}")
        run_dir = tmp / f"fault-{name}"
        cmd = [sys.executable, "-m", "launch", f"nodes={nodes}", "cluster=slurm", "cluster.time_min=15", *TINY,
               "train.max_steps=60", "checkpoint.interval_steps=10", f"train.global_batch_size={2 * nodes}", *extra,
               *data_overrides(tmp),
               f"hydra.run.dir={run_dir}"]
        proc = subprocess.run(cmd, cwd=REPO, env=calls.env(env), capture_output=True, text=True, timeout=1200)
        login = os.uname().nodename
        from_ranks = [c for c in calls.calls() if c.host != login]
        # `scontrol show hostnames` (each rank's start-up) expands a host list locally: no call reaches slurmctld
        local = [c for c in from_ranks if c.argv.startswith("scontrol show hostnames")]
        scontrol = [c for c in from_ranks if c.command == "scontrol" and c not in local]
        ended = json.loads((run_dir / "attempts.jsonl").read_text().splitlines()[0])["time"]
        first = [c for c in scontrol if c.time <= ended + 1]  # the attempt that hung or was preempted
        out[name] = {"exit": proc.returncode, "hosts_calling": len({c.host for c in first}),
                     "processes_calling": len({(c.host, c.pid) for c in first}),
                     "later_attempts_calls": len(scontrol) - len(first),
                     "hostlist_expansions": len(local),
                     **{f"ranks_{k}": v for k, v in Counter(c.command for c in from_ranks).items()}}
    return out


@dataclass
class Fit:
    form: str  # "linear", "log" or "constant"
    a: float
    b: float

    def at(self, n: float) -> float:
        return self.a + self.b * {"linear": n, "log": math.log2(n), "constant": 0.0}[self.form]

    def __str__(self) -> str:
        if self.form == "constant":
            return f"{self.a:.3g} (constant)"
        x = "n" if self.form == "linear" else "log2 n"
        return f"{self.a:.3g} + {self.b:.3g} x {x}"


def fit_growth(xs: list[float], ys: list[float]) -> Fit:
    """a + b*log2(n) or a + b*n, whichever leaves the smaller squared residual (log on a tie: two sizes fit both
    exactly). A cost that falls with the size is noise around a constant: its mean, which a projection keeps."""
    if len(set(xs)) < 2:
        return Fit("constant", float(np.mean(ys)), 0.0)
    best = None
    for form, x in (("log", np.log2(np.array(xs, float))), ("linear", np.array(xs, float))):
        (b, a), res, *_ = np.polyfit(x, np.array(ys, float), 1, full=True)
        sse = float(res[0]) if len(res) else 0.0
        if best is None or sse < best[0] - 1e-9 * (1 + best[0]):
            best = (sse, Fit(form, float(a), float(b)))
    return best[1] if best[1].b >= 0 else Fit("constant", float(np.mean(ys)), 0.0)


def project(rows: list[Measured]) -> list[dict]:
    """Each cost fitted against its size and projected to PROJECT_NODES x RANKS_PER_NODE, beside its budget."""
    out = []
    costs = (("fs_ops_per_node_s", "nodes", lambda m: m.fs_ops_per_s / m.nodes, lambda f, n: f.at(n)),
             ("slurm_calls_per_job_min", "nodes", lambda m: m.rank_slurm_calls_per_min, lambda f, n: f.at(n)),
             ("rendezvous_s", "ranks", lambda m: m.rendezvous_s, lambda f, n: f.at(n * RANKS_PER_NODE)))
    for where in sorted({m.where for m in rows}):
        mine = [m for m in rows if m.where == where]
        for name, axis, value, at in costs:
            pts = [(getattr(m, axis), value(m)) for m in mine if value(m) is not None]
            if not pts or (name.startswith("slurm") and where == "local"):
                continue
            f = fit_growth(*map(list, zip(*pts)))
            projected = {n: round(at(f, n), 3) for n in PROJECT_NODES}
            budget = BUDGETS.get(name)
            holds = (all(v <= budget for v in projected.values()) if budget is not None
                     else f.form != "linear")  # rendezvous: at most logarithmic
            out.append({"where": where, "cost": name, "per": axis, "measured": pts, "fit": str(f),
                        "form": f.form, "projected": projected, "budget": budget or "<= log", "holds": holds})
    return out


def print_tables(rows: list[Measured], projections: list[dict], sweeps: list[dict], fault: dict) -> None:
    print("\nmeasured (steady state; checkpoint files left out of ops/s)")
    print(f"{'where':<6} {'nodes':>5} {'ranks':>5} {'steady s':>8} {'fs ops/s':>8} {'/node/s':>7} {'ckpt ops':>8} "
          f"{'MB':>7} {'rank calls/min':>14} {'launcher calls/min':>18} {'rendezvous s':>12}")
    for m in rows:
        rdv = f"{m.rendezvous_s:.3f}" if m.rendezvous_s is not None else "n/a"
        print(f"{m.where:<6} {m.nodes:>5} {m.ranks:>5} {m.steady_s:>8.1f} {m.fs_ops_per_s:>8.2f} "
              f"{m.fs_ops_per_s / m.nodes:>7.2f} {m.checkpoint_ops:>8} {sum(m.bytes.values()) / 1e6:>7.2f} "
              f"{m.rank_slurm_calls_per_min:>14.2f} {m.launcher_slurm_calls_per_min:>18.2f} {rdv:>12}")
    for s in sweeps:
        print(f"sweep of {s['points']} points: submitted in {s['submitted_s']} s with {s['sbatch_calls']} sbatch; "
              f"{s['squeue_calls']} squeue calls, {s['squeue_per_poll']} per poll (budget 1); all calls {s['calls']}")
    for name, f in fault.items():
        print(f"{name}: {f['processes_calling']} process(es) on {f['hosts_calling']} node(s) of the attempt that "
              f"ended called scontrol (budget: one process per job); later attempts' scontrol calls: "
              f"{f['later_attempts_calls']}; calls from ranks: "
              f"{ {k: v for k, v in f.items() if k.startswith('ranks_')} }")
    print(f"\nprojection to {', '.join(map(str, PROJECT_NODES))} nodes x {RANKS_PER_NODE} ranks")
    for p in projections:
        proj = ", ".join(f"{n}: {v:g}" for n, v in p["projected"].items())
        print(f"{p['where']:<6} {p['cost']:<24} fit {p['fit']:<26} -> {proj:<40} budget {p['budget']}: "
              f"{'holds' if p['holds'] else 'EXCEEDED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--local-nodes", type=int, nargs="*", default=[1, 2, 4], help="cluster=local node counts")
    ap.add_argument("--tasks-per-node", type=int, default=2)
    ap.add_argument("--slurm-nodes", type=int, nargs="*", default=[], help="node counts on the local Slurm cluster")
    ap.add_argument("--sweep-points", type=int, nargs="*", default=[], help="sweep sizes on the local Slurm cluster")
    ap.add_argument("--faults", action="store_true", help="a requeue and a hang on the largest Slurm size")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--step-s", type=float, default=0.1, help="rank 0 sleeps this long a step (train.log_interval=10)")
    args = ap.parse_args()
    rows: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="control-plane-") as tmp_name:
        tmp = Path(tmp_name)
        for n in args.local_nodes:
            rows.append(run_once("local", n, args.tasks_per_node, args.steps, args.step_s, dict(os.environ), tmp))
            print(f"local nodes={n}: {rows[-1].fs_ops_per_s:.2f} metadata ops/s", flush=True)
        env = slurm_env() if args.slurm_nodes or args.sweep_points else {}
        for n in args.slurm_nodes:
            rows.append(run_once("slurm", n, 1, args.steps, args.step_s, env, tmp))
            print(f"slurm nodes={n}: {rows[-1].fs_ops_per_s:.2f} metadata ops/s, calls {rows[-1].calls}", flush=True)
        sweeps = [sweep_polls(p, env, tmp) for p in args.sweep_points]
        fault = faults(max(args.slurm_nodes), env, tmp) if args.faults and args.slurm_nodes else {}
    projections = project(rows)
    print_tables(rows, projections, sweeps, fault)
    path = save_results("control_plane", {"command": " ".join(sys.argv), "measured": [asdict(m) for m in rows],
                                          "sweeps": sweeps, "faults": fault, "projections": projections})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
