"""What an experiment tracker holds for a run, read from the tracker's own files: a W&B offline run's .wandb
records, an MLflow file store through MlflowClient, as {(key, step): [values]}. Tests compare it with the run's
rank-0 metrics file."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from gpt.run_folder import RunFolder
from gpt.train.tracker import TAG, file_store_allowed, run_id
from gpt.train.wandb_segments import history, records

Points = dict[tuple[str, int], list[float]]


def wandb_points(run_dir: Path) -> tuple[set[str], Points]:
    """(the run ids of every offline segment, its points)."""
    ids = {r.run.run_id for f in (run_dir / "wandb").glob("*-run-*/run-*.wandb") for r in records(f)
           if r.WhichOneof("record_type") == "run"}
    points = defaultdict(list)
    for step, key, value in history(run_dir, run_id(run_dir)):
        points[key, step].append(value)
    return ids, points


def mlflow_points(run_dir: Path, project: str = "gptlaunch") -> tuple[set[str], Points]:
    """(the MLflow run ids tagged with this run's id, their points) from the default store."""
    from mlflow.tracking import MlflowClient

    with file_store_allowed():
        client = MlflowClient((run_dir.parent / "mlruns").resolve().as_uri())
        experiment = client.get_experiment_by_name(project)
        runs = client.search_runs([experiment.experiment_id], f"tags.`{TAG}` = '{run_id(run_dir)}'")
        points = defaultdict(list)
        for run in runs:
            for key in run.data.metrics:
                for m in client.get_metric_history(run.info.run_id, key):
                    points[key, m.step].append(m.value)
    return {r.info.run_id for r in runs}, points


def expected_points(run_dir: Path) -> Points:
    """Rank 0's metrics file as tracker points: what the tracker must hold, each point once."""
    points = defaultdict(list)
    for line in RunFolder(run_dir).metrics_file(0).read_text().splitlines():
        r = json.loads(line)
        for key, value in r.items():
            if key not in ("kind", "step", "rank", "host", "time", "elapsed_s") and isinstance(value, (int, float)):
                points[key if "/" in key else f"{r['kind']}/{key}", r["step"]].append(value)
    return points


def tracker_points(kind: str, run_dir: Path) -> tuple[set[str], Points]:
    return wandb_points(run_dir) if kind == "wandb" else mlflow_points(run_dir)


def assert_tracked_once(kind: str, run_dir: Path, runs: set[str] | None = None) -> set[str]:
    """The tracker holds one run (`runs`, when given) with every point of the metrics file, each once, the values
    of the exact ones (losses, learning rate, gradient norms) equal. Returns the tracker run's ids."""
    ids, points = tracker_points(kind, run_dir)
    expected = expected_points(run_dir)
    assert len(ids) == 1 and (runs is None or ids == runs), (ids, runs)
    assert points.keys() == expected.keys(), sorted(set(points) ^ set(expected))[:10]
    exact = [p for p in expected if p[0] in ("train/loss", "val/loss", "train/lr") or p[0].startswith("grad_norm")]
    assert exact and all(set(points[p]) == set(expected[p]) for p in exact)
    assert all(len(v) == 1 for v in points.values()), [p for p, v in points.items() if len(v) > 1]
    return ids


def tracker_artifacts(kind: str, run_dir: Path) -> set[str]:
    """The files of the artifacts attached to the run's tracker run, as 'artifact/file'."""
    if kind == "wandb":
        found = set()
        for f in sorted((run_dir / "wandb").glob("*-run-*/run-*.wandb")):
            for r in records(f):
                if r.WhichOneof("record_type") == "artifact":
                    found |= {f"{r.artifact.name}/{e.path}" for e in r.artifact.manifest.contents}
        return found
    from mlflow.tracking import MlflowClient

    with file_store_allowed():
        client = MlflowClient((run_dir.parent / "mlruns").resolve().as_uri())
        experiment = client.get_experiment_by_name("gptlaunch")
        run = client.search_runs([experiment.experiment_id], f"tags.`{TAG}` = '{run_id(run_dir)}'")[0]
        return {a.path for top in client.list_artifacts(run.info.run_id) if top.is_dir
                for a in client.list_artifacts(run.info.run_id, top.path)}
