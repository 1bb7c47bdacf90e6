"""An experiment tracker (W&B or MLflow) that mirrors rank 0's metrics: the same points as its JSONL file and
TensorBoard run, under one tracker run per gptlaunch run. The tracker run's id comes from the run's identity
(RUN_DIR/run.json's folder name and creation time), so every requeue, resubmission and chained job continues the
same tracker run. A tracker cannot drop points, so each attempt first asks what the tracker run holds and logs
only points it lacks: those the previous attempt could not log (its rank died, or the preemption signal stopped
W&B's service) come from the metrics file. A tracker that fails, or cannot start (an outage, a bad token), never
stops training: one warning line, and the next attempt fills the gap. Torch-free: the launcher uses it to attach a
sweep's report. wandb and mlflow are optional extras, imported only when tracking.kind names them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpt.config.tracking import TrackingConfig
from gpt.resilience.disk_faults import cause, os_error
from gpt.run_folder import RunFolder

log = logging.getLogger(__name__)
TAG = "gptlaunch.run_id"  # the MLflow tag that finds a run's tracker run again


def run_id(run_dir: Path) -> str:
    """Stable for the life of the run, whatever attempt or job asks: its folder name and its run.json's creation
    time (a folder deleted and started again is a new run)."""
    try:
        created = json.loads(RunFolder(run_dir).identity.read_text()).get("created")
    except (OSError, ValueError):
        created = None
    return hashlib.sha1(f"{run_dir.resolve().name}@{created}".encode()).hexdigest()[:16]


class TrackerRun:
    """One tracker run, continued. `logged`: key -> the last step it holds a point of."""

    kind = ""

    def __init__(self) -> None:
        self.logged: dict[str, int] = {}
        self.broken = False
        self.folder: Path | None = None  # where it writes its own files on this machine, if it does

    def log(self, step: int, values: Mapping[str, float]) -> None:
        fresh = {k: v for k, v in values.items() if step > self.logged.get(k, -1)}
        if fresh and not self.broken:
            self.guarded(f"logging step {step}", self._log, step, fresh)

    def attach(self, folder: Path, name: str) -> None:
        self.guarded(f"attaching {folder}", self._attach, folder, name)

    def close(self) -> None:
        if not self.broken:
            self.guarded("closing", self._close)

    def guarded(self, what: str, call, *args: Any) -> None:
        try:
            call(*args)
        except Exception as e:  # noqa: BLE001 - whatever the tracker raises, training goes on
            self.broken = True
            storage = os_error(e)
            why = (f"cannot write its files in {self.folder}: {cause(storage)}" if storage and self.folder
                   else one_line(e))
            log.warning("tracking=%s failed while %s (%s); training is not affected: the metrics file holds every "
                        "point, and the next attempt gives the tracker those it lacks", self.kind, what, why)

    def _log(self, step: int, values: Mapping[str, float]) -> None: ...
    def _attach(self, folder: Path, name: str) -> None: ...
    def _close(self) -> None: ...


def open_tracker(cfg: TrackingConfig, run_dir: Path, name: str, config: dict[str, Any] | None) -> TrackerRun | None:
    """The run's tracker run, created or continued; None when tracking is off. `name` is the run's (a sweep's
    point adds its folder); `config` is logged when the tracker run is new."""
    if cfg.kind == "none":
        return None
    if run_dir.name != name:  # a sweep's point: runs/sweeps/<run>/<point>
        name = f"{name}/{run_dir.name}"
    opener = WandbRun if cfg.kind == "wandb" else MlflowRun
    try:
        return opener(cfg, run_dir, name, config)
    except Exception as e:  # noqa: BLE001 - an outage, a race, a bug of the tracker's: the run goes on without it
        log.warning("tracking=%s could not start (%s); training is not affected: the run's metrics files hold every "
                    "point, and the next attempt gives the tracker those it lacks", cfg.kind, one_line(e))
        return None


def one_line(e: BaseException) -> str:
    """A tracker's error in one line (W&B's and MLflow's messages often span several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class WandbRun(TrackerRun):
    kind = "wandb"

    def __init__(self, cfg: TrackingConfig, run_dir: Path, name: str, config: dict[str, Any] | None):
        import wandb

        from gpt.train.wandb_segments import last_steps

        super().__init__()
        self.folder = run_dir / "wandb"
        key = run_id(run_dir)
        self.logged = last_steps(run_dir, key)
        self.run = wandb.init(project=cfg.project, id=key, resume="allow", mode=cfg.mode, name=name,
                              dir=str(run_dir), config=config, settings=wandb.Settings(console="off", quiet=True))

    def _log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def _attach(self, folder: Path, name: str) -> None:
        import wandb

        artifact = wandb.Artifact(name, type="report")
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def _close(self) -> None:
        self.run.finish()


class MlflowRun(TrackerRun):
    kind = "mlflow"

    def __init__(self, cfg: TrackingConfig, run_dir: Path, name: str, config: dict[str, Any] | None):
        super().__init__()
        uri = cfg.uri or (run_dir.parent / "mlruns").resolve().as_uri()
        self.folder = Path(uri.removeprefix("file://")) if uri.startswith("file://") else None
        with file_store_allowed():
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=uri)
            experiment_id = self._experiment(cfg.project)
            key = run_id(run_dir)
            found = self.client.search_runs([experiment_id], f"tags.`{TAG}` = '{key}'", max_results=1)
            if found:
                self.id = found[0].info.run_id
                self.client.update_run(self.id, status="RUNNING")
                for metric in found[0].data.metrics:
                    self.logged[metric] = max(m.step for m in self.client.get_metric_history(self.id, metric))
            else:
                self.id = self.client.create_run(experiment_id, tags={TAG: key}, run_name=name).info.run_id
                if config is not None:
                    self.client.log_dict(self.id, config, "config.json")

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if it does not exist. The points of a sweep start at once, and all but one
        find that another created it between their look-up and their creation: they take that one."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        with file_store_allowed():
            self.client.log_batch(self.id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])

    def _attach(self, folder: Path, name: str) -> None:
        with file_store_allowed():
            self.client.log_artifacts(self.id, str(folder), name)

    def _close(self) -> None:
        with file_store_allowed():
            self.client.set_terminated(self.id)


@contextmanager
def file_store_allowed() -> Iterator[None]:
    """MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set; gptlaunch's default store is one
    (it needs no database or server, and lives on the shared file system). Set only while MLflow is called, so the
    launcher's environment is left as it was."""
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MLFLOW_ALLOW_FILE_STORE"]
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = before
