"""launch.cancel on a packed sweep (hydra.launcher.pack): its points share one job, and the cancel is one decision for the
whole allocation. Every point is told (a request in each run folder), so that each records its own cancel and the
packer requeues nothing; the final scancel comes only once every running point has saved. Slurm's client commands
are stood in for as commands.run calls them; tests/slurm/test_pack.py cancels a real packed job."""
from __future__ import annotations

import io
import json

from gpt.config import schema
from gpt.run_folder import RunFolder
from helpers import compose
from launch import launch_config
from launch.backends.slurm import commands
from launch.cancel import cancel
from launch.run.job_record import CANCELLED, cancel_requested


def packed_sweep(sweep, job_id: str = "9", points: int = 3):
    runs, config = [], launch_config.parse(compose("train.max_steps=3"))
    for s in range(1, points + 1):
        run = sweep / f"seed={s}"
        run.mkdir(parents=True)
        schema.save(config, run / "config.yaml")
        (run / "run.json").write_text("{}\n")
        (run / "slurm_job.json").write_text(json.dumps({"job_id": job_id, "packed": True}))
        runs.append(run)
    return runs


def test_a_packed_job_is_cancelled_once_every_point_saved_as_the_users_cancel(tmp_path, monkeypatch):
    runs = packed_sweep(tmp_path / "sweep")
    calls: list[tuple[str, ...]] = []
    lines_at_the_cancel: list[int] = []

    def run(*cmd: str, **_) -> str:
        calls.append(cmd)
        if cmd[0] == "squeue":
            saving = [r for r in runs if cancel_requested(r, "9") and not RunFolder(r).attempts.log.exists()]
            if saving and any(c[:2] == ("scancel", "--signal=USR2") for c in calls):  # one point saves per poll
                RunFolder(saving[0]).attempts.append("9", 0, {"ended": CANCELLED, "requeued": False})
            return "9|RUNNING|None\n"
        if cmd[0] == "scancel" and len(cmd) == 2:
            lines_at_the_cancel.append(sum(RunFolder(r).attempts.log.exists() for r in runs))
        return ""

    monkeypatch.setattr(commands, "run", run)
    assert cancel(tmp_path / "sweep", wait_s=30, out=io.StringIO()) == 0
    assert all(cancel_requested(r, "9") for r in runs)  # each point stops as cancelled, none as preempted
    assert [c for c in calls if c[0] == "scancel"] == [("scancel", "--signal=USR2", "9"), ("scancel", "9")]
    assert lines_at_the_cancel == [3]  # the job's one signal, and its cancel after every point saved
