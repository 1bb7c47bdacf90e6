"""The Optuna sweeper (hydra/sweeper=optuna) on the real local Slurm cluster: each batch of trials is one packed
allocation, and the sweeper chooses from the validation losses the jobs' runs return
(launch.hydra_launcher.PointReturn), with the sweep's early stopping (launcher.early_stop=asha) at a rung half way; a
trial whose job fails is a failed trial, and the search goes on."""
from __future__ import annotations

import json
import re
import sqlite3

import pytest
import yaml

from slurm_helpers import SLURM, TINY, output, run_launch
from test_detached import verb

pytestmark = pytest.mark.slurm

RUN = [o for o in TINY if not o.startswith(("train.max_steps", "train.eval_interval"))] + [
    "strategy=single", "train.max_steps=20", "train.eval_interval=10", "launcher.early_stop=asha", "launcher.eta=2"]


@pytest.mark.timeout(300)
def test_optuna_batches_on_slurm_find_the_learning_rate_a_grid_knows_is_best(slurm_cluster, tmp_path, data_overrides):
    """Seed 0 samples both learning rates in its one batch of two (0.01 trains the tiny model further than 0.0003 in
    10 and 20 steps, as the local grid in tests/launch/test_optuna_sweep.py shows): one packed job of two points, and
    the best Optuna reports is the lower of the two runs' validation losses, with its learning rate."""
    sweep = tmp_path / "sweep"
    proc = run_launch(slurm_cluster.env, "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                      "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.seed=0", "train.lr=choice(0.0003,0.01)",
                      "hydra.launcher.pack=true", *SLURM, *RUN, *data_overrides, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("submitted job ") == 1 and "2 packed point(s)" in proc.stdout, proc.stdout
    summaries = {float(t.name.split("train.lr=")[1]): json.loads((t / "summary.json").read_text())
                 for t in sweep.glob("trial=*")}
    losses = {lr: s["val_loss"] for lr, s in summaries.items()}
    assert set(losses) == {0.0003, 0.01} and losses[0.01] < losses[0.0003], losses
    # The two run at once: the better goes on at the rung whatever it sees there; the worse stops there if it comes
    # second, and then returns its loss at the rung
    assert summaries[0.01]["last_step"] == 20 and "stopped_early" not in summaries[0.01], summaries
    worse = summaries[0.0003]
    assert worse["last_step"] == 20 or worse["stopped_early"].startswith("stopped early at step 10 (rung 0)"), worse
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"train.lr": 0.01} and best["best_value"] == pytest.approx(losses[0.01]), best


@pytest.mark.timeout(300)
def test_a_trial_whose_job_fails_is_a_failed_trial_and_the_search_goes_on(slurm_cluster, tmp_path, data_overrides):
    """Two trials one after the other over where rank 0 kills itself (debug.kill_step=3, with no restart), or past the
    last step (1000: never): the job that fails is a failed trial of the study in the sweep folder, with a line, and
    the other trial still runs and is the best, whichever the grid sampler tries first."""
    sweep = tmp_path / "sweep"
    proc = run_launch(slurm_cluster.env, "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid",
                      "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", "debug.kill_step=choice(3,1000)",
                      "debug.kill_rank=0", "preemption.max_restarts=0", "preemption.in_job_restarts=0",
                      *SLURM, *RUN[:-2], *data_overrides, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert proc.stdout.count("submitted job ") == 2, proc.stdout
    failed = next(t for t in sweep.glob("trial=*") if t.name.endswith("debug.kill_step=3"))
    number = failed.name.split(",")[0].split("=")[1]
    assert f"optuna: trial {number} failed: its job " in proc.stderr and f"(run folder {failed})" in proc.stderr, (
        proc.stderr[-3000:])
    assert "optuna: 1 of 2 trial(s) failed" in proc.stderr
    with sqlite3.connect(sweep / "optuna.db") as db:
        assert sorted(db.execute("SELECT state FROM trials").fetchall()) == [("COMPLETE",), ("FAIL",)]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"debug.kill_step": 1000} and best["failed"] == 1, best


@pytest.mark.timeout(400)
def test_a_detached_search_goes_on_in_a_job_of_its_own(slurm_cluster, tmp_path, data_overrides):
    """hydra.launcher.detach=true: the command submits the first batch, then a job of the search's own after it, and
    returns. That job runs the same command without detach: it reads the first batch's results back as its trials
    (numbers 0 and 1, run folders as they were), asks and runs the second batch, and writes the best; launch.status
    shows it and waits for it (exit 3) until it ends."""
    sweep = tmp_path / "sweep"
    proc = run_launch(slurm_cluster.env, "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4",
                      "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.seed=0", "train.lr=choice(0.0003,0.01)",
                      "hydra.launcher.detach=true", *SLURM, *RUN[:-2], *data_overrides, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert proc.stdout.count("submitted job ") == 2 and "detached: job(s) " in proc.stdout, proc.stdout
    job = re.search(r"^search: job (\d+) goes on with the search once they have ended", proc.stdout, re.M)[1]
    assert not (sweep / "optimization_results.yaml").exists()
    status = verb(slurm_cluster.env, "status", str(sweep))
    assert status.returncode == 3 and f"search: job {job} " in status.stdout, status.stdout
    assert slurm_cluster.wait_state(job, timeout=300) == "COMPLETED", (sweep / "slurm" / f"search-{job}.out").read_text()
    log = (sweep / "slurm" / f"search-{job}.out").read_text()
    assert "2 trial(s) so far, 2 to ask (n_trials=4)" in log and "trial(s) 0, 1 were running" in log, log
    assert log.count("finished at step 20; nothing to do") == 2 and log.count("submitted job ") == 2, log
    with sqlite3.connect(sweep / "optuna.db") as db:
        assert db.execute("SELECT number, state FROM trials ORDER BY number").fetchall() == [
            (n, "COMPLETE") for n in range(4)]
    assert sorted(t.name.split(",")[0] for t in sweep.glob("trial=*")) == [f"trial={n}" for n in range(4)]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"train.lr": 0.01} and best["complete"] == 4, best
    assert verb(slurm_cluster.env, "status", str(sweep)).returncode == 0


@pytest.mark.timeout(300)
def test_cancelling_a_detached_search_cancels_its_job_first(slurm_cluster, tmp_path, data_overrides):
    """launch.cancel SWEEP --now: the search's job (waiting on the first batch) is cancelled with the trials' jobs, so
    that nothing launches them again; the study keeps the trials running, for the same command."""
    sweep = tmp_path / "sweep"
    proc = run_launch(slurm_cluster.env, "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4",
                      "hydra.sweeper.n_jobs=2", "train.lr=choice(0.0003,0.01)", "hydra.launcher.detach=true",
                      *SLURM, *RUN[:-2], "train.max_steps=1000", *data_overrides, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    job = re.search(r"^search: job (\d+) goes on", proc.stdout, re.M)[1]
    cancel = verb(slurm_cluster.env, "cancel", str(sweep), "--now")
    assert cancel.returncode == 0 and f"cancelled the search's job {job}" in cancel.stdout, output(cancel)
    assert "cancelled job(s) " in cancel.stdout, output(cancel)  # the trials' jobs too
    assert slurm_cluster.wait_state(job) == "CANCELLED"
    with sqlite3.connect(sweep / "optuna.db") as db:
        assert db.execute("SELECT state FROM trials").fetchall() == [("RUNNING",), ("RUNNING",)]
