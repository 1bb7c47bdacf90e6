"""data.prepare_on=job: one Slurm job prepares a sweep's data before its training jobs, which depend on it
(--dependency=afterok, and --kill-on-invalid-dep: Slurm cancels them itself if it fails, even with the launcher
gone). Each of its data.prepare_nodes tasks (one per node) tokenizes its share of the parts with every core of
its node (gpt.data.prepare); task 0 then writes meta.json. A second launch while it waits or runs reuses it, and a
killed one resumes from the parts it finished. Torch-free."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gpt.config.data import DataConfig
from launch.backends import Point, RunFailed
from launch.backends.slurm import commands as slurm_commands
from launch.backends.slurm.commands import FINAL, GONE, PENDING, RUNNING
from launch.backends.slurm.resources import SlurmResources, make_executor
from launch.backends.slurm.step import workdir
from launch.backends.slurm.submitted import show_path


@dataclass(frozen=True)
class PrepareTask:
    """What every task of the preparation job runs (submitit pickles it)."""

    data: DataConfig

    def __call__(self) -> str:
        from gpt.data import ensure_prepared

        node, nodes = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        return str(ensure_prepared(self.data, node=node, nodes=nodes))


@dataclass(frozen=True)
class PreparationJob:
    job_id: str
    log: Path  # task 0's error output: where a failure's traceback is

    def gate(self, point: Point) -> Point:
        """The point's job, to start only once this job has succeeded (and be cancelled if it fails)."""
        flags = (("dependency", f"afterok:{self.job_id}"), ("kill-on-invalid-dep", "yes"))
        return dataclasses.replace(point, resources=dataclasses.replace(
            point.resources, sbatch=tuple(sorted((*point.resources.sbatch, *flags)))))

    def wait(self, gated: list[str], poll_s: float = 1.0, out=sys.stdout) -> None:
        """Until it has ended; RunFailed (one line naming its log) when it failed, once `gated` are cancelled."""
        print(f"waiting for the data preparation job {self.job_id} (log: {show_path(self.log)})", file=out,
              flush=True)
        while (state := _state(self.job_id)) not in FINAL and state != GONE:
            time.sleep(poll_s)
        if state in ("COMPLETED", GONE) and not _failure(self.log):
            return
        slurm_commands.cancel(gated)
        why = _failure(self.log)
        raise RunFailed(f"the data preparation job {self.job_id} ended {state if state != GONE else 'FAILED'}"
                        f"{': ' + why if why else ''}; the training job(s) {' '.join(gated)} would never start "
                        f"(DependencyNeverSatisfied) and are cancelled. Its log: {show_path(self.log)}")


def _state(job_id: str) -> str:
    try:
        return slurm_commands.job_infos([job_id])[job_id].state
    except slurm_commands.SlurmUnavailable:
        return "UNKNOWN"


_RAISED = re.compile(r"^[\w.]+(Error|Exception): (.*)$")


def _failure(log: Path) -> str:
    """The message of the error a task raised, from its error output (submitit logs the traceback there)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    raised = [m.group(2) for x in lines if (m := _RAISED.match(x.strip()))]
    return raised[-1][:400] if raised else ""


def record_path(data: DataConfig) -> Path:
    """Where the preparation job of data.dir is recorded, next to it (and its temp folders)."""
    out = Path(data.dir)
    return out.parent / f".{out.name}.prepare-job.json"


def live_preparation(data: DataConfig) -> PreparationJob | None:
    """The job an earlier launch submitted to prepare this data the same way, while it waits or runs."""
    try:
        record = json.loads(record_path(data).read_text())
        job = PreparationJob(record["job_id"], Path(record["log"]))
        same = record["data"] == dataclasses.asdict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    state = _state(job.job_id)
    return job if same and (state in PENDING or state in RUNNING) else None


def preparation_resources(data: DataConfig, like: SlurmResources) -> SlurmResources:
    """data.prepare_nodes nodes, one task each with the CPUs of a training job's node, on the training jobs'
    partition, account and container, without GPUs, for the training jobs' time limit, never requeued. No spare
    nodes: its tasks wait for each other's parts, so a failed task or node must end the job (--kill-on-bad-exit=1,
    no --no-kill), not leave the others waiting to the time limit."""
    return dataclasses.replace(
        like, nodes=data.prepare_nodes, tasks_per_node=1, gpus_per_node=0, gpus_per_task=0, gres=None,
        cpus_per_task=(like.cpus_per_task or 1) * like.tasks_per_node, requeue=False, restarts=0, chain=1,
        spare_nodes=0, no_kill=False, sbatch=tuple((k, v) for k, v in like.sbatch if k != "gres"))


def submit_preparation(data: DataConfig, like: SlurmResources, job_name: str, folder: Path,
                       out=sys.stdout) -> PreparationJob:
    """The preparation job (preparation_resources), or the live one of an earlier launch."""
    if (job := live_preparation(data)) is not None:
        print(f"data preparation job {job.job_id}, submitted earlier, still runs or waits; the training jobs "
              "depend on it", file=out, flush=True)
        return job
    resources = preparation_resources(data, like)
    folder.mkdir(parents=True, exist_ok=True)
    submitted = make_executor(resources, folder, f"{job_name}-prepare", workdir()).submit(PrepareTask(data))
    job = PreparationJob(submitted.job_id, Path(submitted.paths.stderr))
    path = record_path(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"job_id": job.job_id, "log": str(job.log), "data": dataclasses.asdict(data)}))
    os.replace(tmp, path)
    print(f"submitted data preparation job {job.job_id}: {resources.describe()}; log: {show_path(job.log)}",
          file=out, flush=True)
    return job

