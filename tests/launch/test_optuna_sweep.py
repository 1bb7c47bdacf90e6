"""A search beyond the grid: Hydra's Optuna sweeper drives gptlaunch's launcher, which returns each point's
objective (launcher.objective, a value of the run's summary: the final validation loss by default)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import launch
from launch.hydra_launcher import PointReturn

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
    reports is the lowest validation loss in the trials' summaries, with its learning rate."""
    sweep = tmp_path / "sweep"
    launch("hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
           "hydra.sweeper.sampler.seed=1", "train.lr=choice(0.0003,0.01)", *RUN, *data_overrides,
           run_dir=sweep, multirun=True)
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


@pytest.mark.slow
def test_an_objective_the_runs_never_have_is_refused_before_anything_runs(tmp_path: Path, data_overrides):
    sweep = tmp_path / "sweep"
    proc = launch("hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "train.lr=choice(0.0003,0.01)", *RUN,
                  "train.eval_interval=0", *data_overrides, run_dir=sweep, multirun=True, check=False)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and errors == [
        "error: hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper chooses points from their "
        "launcher.objective=val_loss, and the runs never evaluate (train.eval_interval=0)"], proc.stderr[-3000:]
    assert not list(sweep.glob("*/summary.json"))
