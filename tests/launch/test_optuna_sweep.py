"""A search beyond the grid: gptlaunch's Optuna sweeper (hydra_plugins/gptlaunch_optuna) drives gptlaunch's launcher,
which returns each point's objective (launcher.objective, a value of the run's summary: the final validation loss by
default). Its study is kept in the sweep folder (optuna.db), so the same command resumes it."""
from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from helpers import launch
from hydra_plugins.gptlaunch_optuna.gptlaunch_optuna import (Direction, GridSamplerConf, OptunaSweeper,
                                                             TPESamplerConf)
from launch.hydra_launcher import PointReturn
from launch.optuna_space import search_space

RUN = ["model=tiny", "train.max_steps=20", "train.eval_interval=20", "train.warmup_steps=2",
       "checkpoint.interval_steps=0"]


def test_a_points_float_is_its_objective_and_a_missing_one_names_what_there_is():
    result = PointReturn({"run_dir": "/r", "summary": {"val_loss": 2.5, "train_loss": 2.4}}, "val_loss")
    assert float(result) == 2.5 and result["run_dir"] == "/r"  # still the dict every launcher returned
    assert float(PointReturn(dict(result), "train_loss")) == 2.4
    with pytest.raises(ValueError, match=r"^launcher.objective=mfu: the run /r has no such value in its summary "
                                         r"\(it has train_loss, val_loss\)"):
        float(PointReturn(dict(result), "mfu"))


@pytest.mark.slow
def test_optuna_chooses_from_the_runs_validation_losses(tmp_path: Path, data_overrides):
    """Four trials in batches of two over a learning rate known to be better (0.01 trains the tiny model faster than
    0.0003 in 20 steps): each trial is a run of its own, even where the sampler repeats a value, and the best Optuna
    reports is the lowest validation loss in the trials' summaries, with its learning rate. The study is in the sweep
    folder: the same command with n_trials=5 runs the fifth trial alone, trial=4, and leaves the others' runs be."""
    sweep = tmp_path / "sweep"
    args = ["hydra/sweeper=optuna", "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.seed=1",
            "train.lr=choice(0.0003,0.01)", *RUN, *data_overrides]
    launch(*args, "hydra.sweeper.n_trials=4", run_dir=sweep, multirun=True)
    trials = sorted(sweep.glob("trial=*"))
    assert [t.name.split(",")[0] for t in trials] == ["trial=0", "trial=1", "trial=2", "trial=3"], trials
    losses = {t.name: json.loads((t / "summary.json").read_text())["val_loss"] for t in trials}
    lrs = {t.name: float(t.name.split("train.lr=")[1]) for t in trials}
    assert set(lrs.values()) == {0.0003, 0.01}, lrs  # the seed tries both
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    name = min(losses, key=losses.get)
    assert best["best_value"] == pytest.approx(losses[name]) and best["best_params"] == {"train.lr": 0.01}, (
        best, losses)
    assert lrs[name] == 0.01
    assert (sweep / "optuna.db").is_file() and best["storage"] == f"sqlite:///{sweep / 'optuna.db'}"
    written = {t.name: (t / "summary.json").stat().st_mtime_ns for t in trials}
    proc = launch(*args, "hydra.sweeper.n_trials=5", run_dir=sweep, multirun=True)
    assert "4 trial(s) so far, 1 to ask (n_trials=5)" in proc.stdout, proc.stdout[-3000:]
    trials = sorted(sweep.glob("trial=*"))
    assert [t.name.split(",")[0] for t in trials] == [f"trial={n}" for n in range(5)], trials
    assert {t.name: (t / "summary.json").stat().st_mtime_ns for t in trials[:4]} == written
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["complete"] == 5


@pytest.mark.slow
def test_an_objective_the_runs_never_have_is_refused_before_anything_runs(tmp_path: Path, data_overrides):
    sweep = tmp_path / "sweep"
    proc = launch("hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "train.lr=choice(0.0003,0.01)", *RUN,
                  "train.eval_interval=0", *data_overrides, run_dir=sweep, multirun=True, check=False)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and errors == [
        "error: hydra_plugins.gptlaunch_optuna.gptlaunch_optuna.OptunaSweeper chooses points from their "
        "launcher.objective=val_loss, and the runs never evaluate (train.eval_interval=0)"], proc.stderr[-3000:]
    assert not list(sweep.glob("*/summary.json"))
    assert not (sweep / "optuna.db").exists()  # a refused first batch leaves no study behind


@pytest.mark.slow
def test_a_detached_search_on_this_machine_is_refused_and_leaves_no_study(tmp_path: Path, data_overrides):
    """Detached, a search goes on in a job of its own (tests/slurm/test_optuna_batches.py): cluster=local has none."""
    sweep = tmp_path / "sweep"
    proc = launch("hydra/sweeper=optuna", "train.lr=choice(0.0003,0.01)", "hydra.launcher.detach=true", *RUN,
                  *data_overrides, run_dir=sweep, multirun=True, check=False)
    assert proc.returncode == 2 and "hydra.launcher.detach=True is not valid: false with cluster=local" in proc.stderr, (
        proc.stderr)
    assert not (sweep / "optuna.db").exists()


def test_the_override_grammar_is_optunas_search_space():
    """Hydra's sweeps as Optuna 4's distributions: a range's stop is left out, as the grid sweeper leaves it out; a
    plain override is every trial's; a key given again (the command line after hydra.sweeper.params) wins."""
    space = search_space(["train.lr=interval(0.1, 0.2)", "train.lr=tag(log, interval(1e-4, 3e-2))",
                          "train.warmup_steps=range(50, 500, step=50)", "model=choice(tiny,small)",
                          "train.clip=range(0.5, 2.0, 0.5)", "model.n_layer=4", "+tag=x"])
    assert space.distributions == {"train.lr": FloatDistribution(1e-4, 3e-2, log=True),
                                   "train.warmup_steps": IntDistribution(50, 450, step=50),
                                   "model": CategoricalDistribution(["tiny", "small"]),
                                   "train.clip": FloatDistribution(0.5, 1.5, step=0.5)}
    assert space.fixed == ["model.n_layer=4", "+tag=x"]
    assert space.overrides({"train.lr": 0.001, "model": "tiny"}) == ["train.lr=0.001", "model=tiny",
                                                                     "model.n_layer=4", "+tag=x"]
    del space.distributions["train.lr"]
    assert space.grid() == {"train.warmup_steps": list(range(50, 451, 50)), "model": ["tiny", "small"],
                            "train.clip": [0.5, 1.0, 1.5]}


@pytest.mark.parametrize("args, error", [
    (["hydra/sweeper/sampler=grid", "train.lr=interval(1e-4, 1e-2)"],
     "error: hydra/sweeper/sampler=grid runs every value of train.lr, and an interval(...) has no list of them: use "
     "choice(...) or range(...)"),
    (["hydra.sweeper.n_jobs=0", "train.lr=choice(0.0003,0.01)"],
     "error: hydra.sweeper.n_jobs=0 is not valid: the trials launched together, at least 1")])
def test_a_search_optuna_cannot_run_is_one_line(tmp_path: Path, args, error):
    proc = launch("hydra/sweeper=optuna", *args, *RUN, run_dir=tmp_path / "sweep", multirun=True, check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [error], proc.stderr
    assert not (tmp_path / "sweep").exists()


class FakeLauncher:
    """Each point's objective is a function of its train.lr; lr=0.5 fails as a job does (a run that crashed), lr=0.25
    returns NaN (a run that diverged). Records every (trial number, overrides) it launches."""

    def __init__(self):
        self.launched: list[tuple[int, list[str]]] = []

    def launch(self, job_overrides, initial_job_idx):
        returns = []
        for i, overrides in enumerate(job_overrides):
            self.launched.append((initial_job_idx + i, list(overrides)))
            lr = float(dict(o.split("=", 1) for o in overrides)["train.lr"])
            ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
            ret.return_value = PointReturn({"run_dir": f"trial={initial_job_idx + i}",
                                            "summary": {"val_loss": math.nan if lr == 0.25 else (lr - 0.1) ** 2}},
                                           "val_loss")
            if lr == 0.5:
                ret.status = JobStatus.FAILED
            returns.append(ret)
        return returns


def search(sweep: Path, n_trials: int, launcher: FakeLauncher, sampler=None) -> OptunaSweeper:
    sweeper = OptunaSweeper(sampler=instantiate(OmegaConf.structured(sampler or TPESamplerConf(seed=0))),
                            direction=Direction.minimize, storage=None, study_name=None, n_trials=n_trials, n_jobs=2,
                            params={"train.lr": "choice(0.05,0.1,0.25,0.5)"})
    sweeper.config, sweeper.launcher = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}), launcher
    sweeper.sweep(["model=tiny"])
    return sweeper


def study_states(sweep: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(sweep / "optuna.db") as db:
        return db.execute("SELECT number, state FROM trials ORDER BY number").fetchall()


def test_failed_points_are_failed_trials_and_the_same_command_resumes_the_study(tmp_path: Path, capsys):
    """The grid over four learning rates: the crashed and the diverged points are failed trials, the search goes on
    to the others, and the best is the lowest finite loss. The study is in SWEEP/optuna.db: the same command with
    more trials asks only the new ones, numbered on, and a study that already has n_trials runs nothing."""
    sweep, first = tmp_path / "sweep", FakeLauncher()
    search(sweep, 3, first, GridSamplerConf(seed=0))
    assert [n for n, _ in first.launched] == [0, 1, 2] and all("model=tiny" in o for _, o in first.launched)
    again = FakeLauncher()
    search(sweep, 4, again, GridSamplerConf(seed=0))
    assert [n for n, _ in again.launched] == [3], again.launched  # trials 0-2 are not run again
    lrs = sorted(float(o[0].split("=")[1]) for _, o in first.launched + again.launched)
    assert lrs == [0.05, 0.1, 0.25, 0.5]  # the grid, each point once over both commands
    states = dict(study_states(sweep))
    by_lr = {float(o[0].split("=")[1]): n for n, o in first.launched + again.launched}
    assert states[by_lr[0.5]] == states[by_lr[0.25]] == "FAIL" and states[by_lr[0.1]] == "COMPLETE", states
    err = capsys.readouterr().err
    assert f"optuna: trial {by_lr[0.5]} failed: its run failed (run folder trial={by_lr[0.5]})" in err, err
    assert f"optuna: trial {by_lr[0.25]} failed: its objective is nan (trial={by_lr[0.25]})" in err, err
    assert "optuna: 2 of 4 trial(s) failed" in err
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"train.lr": 0.1} and best["best_value"] == 0 and best["failed"] == 2, best
    done = FakeLauncher()
    search(sweep, 4, done, GridSamplerConf(seed=0))
    assert done.launched == []


def test_trials_an_ended_search_left_running_are_launched_again_with_their_numbers(tmp_path: Path):
    """A sweeper stopped mid-batch (the login node went away) leaves its trials running in the study: the same
    command launches them again first, with their values and numbers (so their run folders, jobs and results are
    the same), then asks for the rest."""
    sweep = tmp_path / "sweep"

    class Interrupted(FakeLauncher):
        def launch(self, job_overrides, initial_job_idx):
            super().launch(job_overrides, initial_job_idx)
            raise KeyboardInterrupt

    first = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        search(sweep, 3, first)
    assert study_states(sweep) == [(0, "RUNNING"), (1, "RUNNING")]
    again = FakeLauncher()
    search(sweep, 3, again)
    assert again.launched[:2] == first.launched and [n for n, _ in again.launched] == [0, 1, 2], again.launched
    assert [s for _, s in study_states(sweep)] != ["RUNNING"] * 3 and len(study_states(sweep)) == 3


@pytest.mark.slow
def test_ctrl_c_of_a_search_leaves_its_trial_running_and_the_same_command_continues_it(tmp_path: Path, data_overrides):
    """A real interruption on cluster=local: Ctrl-C while the one trial trains. Its ranks save (exit 2, as any local
    run's), the study keeps the trial running (not failed), and the same command continues that trial's run from
    its checkpoint to the end and completes the study."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO, losses
    from gpt.run_folder import RunFolder

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "launch", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1",
           "hydra.sweeper.n_jobs=1", "train.lr=choice(0.01)", "model=tiny", "train.max_steps=40", "train.log_interval=1",
           "train.eval_interval=40", "train.warmup_steps=2", "checkpoint.interval_steps=1000", "debug.delay_rank=0",
           "debug.delay_s=0.05", "train.progress=false", *data_overrides, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not any(m.read_text().count("\n") >= 5 for m in sweep.glob("trial=0*/metrics/rank0.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 2, err[-3000:]
    assert "optuna: trial(s) 0 interrupted: left running in the study" in err, err[-3000:]
    assert study_states(sweep) == [(0, "RUNNING")]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert study_states(sweep) == [(0, "COMPLETE")]
    (run,) = sweep.glob("trial=0*")
    assert [a.ended for a in RunFolder(run).attempts.read()] == ["Ctrl-C", "finished"] and len(losses(run)) == 40
