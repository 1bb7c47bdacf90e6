"""eval.after_save=job on a real cluster: each checkpoint the run commits gets one evaluation job of its own, a
one-task job submitted from rank 0 while training goes on, whose figures land in the run folder's metrics,
TensorBoard and report."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import REPO
from slurm_helpers import SLURM, TINY, output, run_launch

pytestmark = pytest.mark.slurm
TASK = REPO / "examples" / "tasks" / "shakespeare_order.jsonl"


@pytest.mark.timeout(300)
def test_each_checkpoint_gets_one_eval_job_whose_figures_join_the_run(slurm_cluster, tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    proc = run_launch(slurm_cluster.env, *SLURM, *[o for o in TINY if not o.startswith("checkpoint.")],
                      "checkpoint.interval_steps=2", "eval.after_save=job", f"eval.tasks=[{TASK}]", "eval.limit=8",
                      *data_overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, output(proc)
    records = {int(p.stem.removeprefix("step")): json.loads(p.read_text())
               for p in (run_dir / "eval-jobs").glob("step*.json")}
    assert sorted(records) == [2, 4, 6], records  # one per checkpoint, the final save's included
    training_job = json.loads((run_dir / "job.json").read_text())["job_id"]
    for step, record in records.items():
        info = slurm_cluster.job_info(record["job_id"])
        # a job still pending shows its node count as min-max ("1-1")
        assert set(info["NumNodes"].split("-")) == {"1"} and info["NumTasks"] == "1" and info.get("Dependency") in (None, "(null)")
        assert info["JobName"] == f"run-eval-{step}" and record["job_id"] != training_job
        assert slurm_cluster.wait_state(record["job_id"]) == "COMPLETED", (
            (run_dir / "slurm").joinpath(f"eval-{step}-{record['job_id']}.out").read_text()[-3000:])
    lines = [json.loads(line) for line in (run_dir / "metrics" / "eval_jobs.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in lines) == [2, 4, 6] and {r["kind"] for r in lines} == {"eval_job"}
    assert all(0 <= r["tasks/shakespeare_order/acc"] <= 1 and r["val_loss"] > 0 for r in lines), lines
    board = EventAccumulator(str(run_dir / "tensorboard" / "eval_jobs"))
    board.Reload()
    assert sorted(e.step for e in board.Scalars("eval_job/val_loss")) == [2, 4, 6]
    report = subprocess.run([sys.executable, "-m", "launch.report", str(run_dir)], cwd=REPO, env=slurm_cluster.env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, output(report)
    assert "| run | shakespeare_order | 6 |" in (run_dir / "report" / "scaling.md").read_text()
