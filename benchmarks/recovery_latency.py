"""Recovery latency on the local Slurm cluster: from a rank's death to the first training step after it, for
(a) a requeue (preemption.in_job_restarts=0), (b) an in-job restart on the same nodes, (c) an in-job restart onto a
spare node (cluster.spare_nodes=1; the dead rank's node is set down as it dies). A 2-node tiny job each time, with
the standby rank that GPU ranks have (preemption.standby_rank=true: this cluster's ranks are on CPUs).

    slurm/local_cluster.sh up 4                       # as root, once
    python benchmarks/recovery_latency.py             # prints a table, writes benchmarks/results/recovery_latency.json
    python benchmarks/recovery_latency.py --repeats 3

`to first step` is the whole gap; `queue` is the part a requeue spends in Slurm (the previous attempt's last
record to the new batch script: completing and pending, `scheduler_s` of the start-up breakdown); the target is
(b) and (c) at most half of (a) without its queue wait. On a busy production cluster the queue wait alone is
minutes to hours.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, SHARED_TEXT, save_results  # noqa: E402
from benchmarks.launch_latency import REQUEUE_RUN, attempts, cluster_env, wait_for_training  # noqa: E402

CASES = {"requeue": ["preemption.in_job_restarts=0"], "in-job, same nodes": [],
         "in-job, onto a spare": ["cluster.spare_nodes=1"]}
STANDBY = ["preemption.standby_rank=true"]


def first_step_after(run_dir: Path, since: float, timeout: float = 300,
                     alive: Callable[[], bool] = lambda: True) -> float:
    """When rank 0 of the next attempt recorded its first training step, the attempt that was running at `since`
    (epoch seconds) having ended then, while `alive()` holds. The next attempt's steps are those recorded after the
    ended attempt's line: rank 0 of that attempt may still record a step it finished as its peer died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        ended = [a["time"] for a in attempts(run_dir) if a["time"] > since]
        if ended:
            for record in _records(run_dir / "metrics" / "rank0.jsonl"):
                if record["kind"] == "train" and record["time"] > ended[0]:
                    return record["time"]
        time.sleep(0.1)
    raise TimeoutError(f"no training step after {since} within {timeout} s (run folder {run_dir})")


def _records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def kill_rank1(run_dir: Path, env: dict[str, str], node_down: bool) -> float:
    """kill -9 of rank 1 (and its node set down, for the spare case); returns when."""
    record = json.loads((run_dir / "environment" / "rank1.json").read_text())
    if node_down:
        subprocess.run(["scontrol", "update", f"nodename={record['host']}", "state=down", "reason=benchmark"],
                       env=env, check=True)
    subprocess.run(["kill", "-9", str(record["pid"])], check=True)
    return time.time()


def measure(case: str, data: list[str], env: dict[str, str]) -> dict[str, float]:
    spare = "spare" in case
    # the ranks of a cancelled job may still write into the run folder as it is removed
    with tempfile.TemporaryDirectory(prefix="recovery-", ignore_cleanup_errors=True) as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "launch", *REQUEUE_RUN, *STANDBY, *CASES[case], *data, f"hydra.run.dir={run_dir}"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        job, node = None, None
        try:
            wait_for_training(run_dir, 0, proc)
            job = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
            node = json.loads((run_dir / "environment" / "rank1.json").read_text())["host"]
            died = kill_rank1(run_dir, env, spare)
            back = first_step_after(run_dir, died, alive=lambda: proc.poll() is None)
            started = start_time(job, env)
        finally:
            if job:
                subprocess.run(["scancel", str(job)], env=env, capture_output=True)
            if spare and node:
                subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=env,
                               capture_output=True)
            proc.terminate()
            proc.wait()
        queue = queue_wait(run_dir, started) if case == "requeue" else 0.0
        return {"to_first_step_s": round(back - died, 2), "queue_s": round(queue, 2),
                "without_queue_s": round(back - died - queue, 2)}


def start_time(job: str, env: dict[str, str]) -> float:
    """When Slurm (re)started the job, by its StartTime (whole seconds)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True).stdout
    field = next(f for f in out.split() if f.startswith("StartTime="))
    return time.mktime(time.strptime(field.split("=", 1)[1], "%Y-%m-%dT%H:%M:%S"))


def queue_wait(run_dir: Path, started: float) -> float:
    """Slurm's part of a requeue: the killed attempt's line (the requeue asked for) -> the job started again."""
    return max(started - float(attempts(run_dir)[0]["time"]), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"some of {', '.join(repr(c) for c in CASES)}")
    args = parser.parse_args()
    env = cluster_env()
    data = [f"data.text_path={SHARED_TEXT}"] if SHARED_TEXT.exists() else []
    rows = {}
    for case in args.cases:
        samples = [measure(case, data, env) for _ in range(args.repeats)]
        rows[case] = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        print(f"  {case}: {rows[case]}", file=sys.stderr, flush=True)
    print(f"\nrank death -> first step of the next attempt, median of {args.repeats} (2-node tiny job, local cluster)")
    print(f"{'case':<22} {'to first step':>14} {'queue':>8} {'without queue':>14}")
    for case, r in rows.items():
        print(f"{case:<22} {r['to_first_step_s']:>12.1f} s {r['queue_s']:>6.1f} s {r['without_queue_s']:>12.1f} s")
    print(f"\nwrote {save_results('recovery_latency', {'repeats': args.repeats, 'cases': rows})}")


if __name__ == "__main__":
    main()
