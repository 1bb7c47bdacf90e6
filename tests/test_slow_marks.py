"""The check that a test which trains through `python -m launch` is marked slow (tests/slow_marks.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from slow_marks import TrainingWatch, run_folders, trained


def write_metrics(run_dir: Path, *kinds: str) -> None:
    (run_dir / "metrics").mkdir(parents=True)
    lines = [json.dumps({"kind": k, "step": 1}) for k in kinds]
    (run_dir / "metrics" / "rank0.jsonl").write_text("\n".join([*lines, '{"kind": "tr']) + "\n")


def test_the_run_folders_are_read_from_launch_commands_only():
    assert run_folders(["python", "-m", "launch", "-m", "hydra.sweep.dir=/s", "x=1"]) == [Path("/s")]
    assert run_folders(["python", "-m", "launch", "hydra.run.dir=/r"]) == [Path("/r")]
    assert run_folders(["python", "-m", "launch.report", "hydra.run.dir=/r"]) == []
    assert run_folders(["python", "launch", "hydra.run.dir=/r"]) == []


def test_a_run_trained_when_a_rank_recorded_a_training_step(tmp_path):
    write_metrics(tmp_path / "sweep" / "0", "eval", "train")
    write_metrics(tmp_path / "refused", "eval")
    assert trained(tmp_path / "sweep") and not trained(tmp_path / "refused") and not trained(tmp_path / "none")


def test_the_watch_names_a_launch_that_trained_and_spares_one_that_did_not(tmp_path):
    original, watch = subprocess.Popen.__init__, TrainingWatch()
    watch.install()
    try:  # `true` ignores its arguments: a real process with a launch's command line
        for name in ("refused", "ran"):
            subprocess.run(["true", "-m", "launch", f"hydra.run.dir={tmp_path / name}"], check=True)
        subprocess.run(["true", "-m", "other", f"hydra.run.dir={tmp_path / 'other'}"], check=True)
    finally:
        watch.uninstall()
    write_metrics(tmp_path / "other", "train")
    assert watch.problem("t") is None
    write_metrics(tmp_path / "ran", "train")
    assert f"t trains through `python -m launch` (in {tmp_path / 'ran'}) but is not marked slow" in watch.problem("t")
    assert subprocess.Popen.__init__ is original
    shutil.rmtree(tmp_path / "ran")  # conftest's own watch saw these commands too: this test trains nothing
