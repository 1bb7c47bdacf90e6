"""A tracker that cannot start never stops the run: one warning line naming the tracker and its error, and the run's
own files stay the record. With the real packages: W&B's init failing as in an online outage, and MLflow's
experiment created by two points of a sweep at once."""
from __future__ import annotations

import json
import logging

import pytest

from gpt.config import schema
from gpt.config.tracking import TrackingConfig
from gpt.collectives.process_group import DistEnv
from gpt.train.tracker import file_store_allowed, open_tracker
from gpt.train.trainer import Trainer
from helpers import plan


def warnings_of_the_tracker(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gpt.train.tracker" and r.levelno >= logging.WARNING]


@pytest.mark.slow
def test_a_wandb_outage_at_start_is_one_warning_and_the_run_trains_on(tmp_path, data_overrides, monkeypatch, caplog):
    import wandb

    def outage(*args, **kwargs):
        raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop.\nwandb: giving up")

    monkeypatch.setattr(wandb, "init", outage)
    run_dir = plan(tmp_path / "run", "model=tiny", "train.max_steps=3", "train.log_interval=1", "train.eval_interval=0",
                   "train.progress=false", "tracking=wandb", "tracking.mode=online", *data_overrides)
    trainer = Trainer(schema.load(run_dir / "config.yaml"), DistEnv(), run_dir)
    trainer.fit()
    assert trainer.step == 3
    [said] = warnings_of_the_tracker(caplog)
    assert said.startswith("tracking=wandb could not start (CommError: Network error (ConnectionError), entering "
                           "retry loop. wandb: giving up); training is not affected"), said
    assert "\n" not in said
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()
             if json.loads(x).get("kind", "train") == "train"]
    assert sorted(set(steps)) == [1, 2, 3]  # the run's own files hold every point


@pytest.mark.slow
def test_an_mlflow_experiment_another_point_created_meanwhile_is_taken(tmp_path, monkeypatch, caplog):
    """Two points of a sweep start at once on one store: both look the experiment up and find none, one creates it,
    and the other's creation meets the error MLflow raises for an existing name. That one takes the experiment."""
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    with file_store_allowed():
        other = MlflowClient(tracking_uri=uri).create_experiment("gptlaunch")  # the other point, first
    looked_up = MlflowClient.get_experiment_by_name
    calls = []

    def before_the_other_created_it(self, name):
        calls.append(name)
        return None if len(calls) == 1 else looked_up(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", before_the_other_created_it)
    (tmp_path / "run").mkdir()
    tracker = open_tracker(TrackingConfig(kind="mlflow", uri=uri), tmp_path / "run", "run", None)
    assert tracker is not None and not warnings_of_the_tracker(caplog)
    with file_store_allowed():
        assert tracker.client.get_run(tracker.id).info.experiment_id == other
    tracker.log(0, {"train/loss": 1.0})
    tracker.close()
    assert not warnings_of_the_tracker(caplog)


@pytest.mark.parametrize("kind", ["wandb", "mlflow"])
def test_any_error_of_a_starting_tracker_is_one_warning_line(tmp_path, monkeypatch, caplog, kind):
    """Whatever the tracker raises as it starts (here: its own client failing), open_tracker gives no tracker."""
    if kind == "wandb":
        import wandb

        monkeypatch.setattr(wandb, "init", lambda *a, **k: (_ for _ in ()).throw(wandb.errors.AuthenticationError(
            "API key\nmust be 40 characters")))
    else:
        from mlflow.tracking import MlflowClient

        monkeypatch.setattr(MlflowClient, "search_runs", lambda *a, **k: (_ for _ in ()).throw(
            ConnectionError("tracking server\nunreachable")))
    (tmp_path / "run").mkdir()
    assert open_tracker(TrackingConfig(kind=kind), tmp_path / "run", "run", None) is None
    [said] = warnings_of_the_tracker(caplog)
    assert said.startswith(f"tracking={kind} could not start (") and "\n" not in said, said
