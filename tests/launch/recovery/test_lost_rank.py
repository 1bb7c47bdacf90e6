"""A rank killed while its host lives: its task requeues the job once per checkpoint of progress, records the
attempt, and tells the rank's peers. Slurm's commands are replaced here; tests/slurm/test_preemption.py kills real
ranks of real jobs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt.config import schema
from launch import launch_config
from helpers import compose
from launch.recovery import lost


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    schema.save(launch_config.parse(compose("preemption.max_restarts=5")), tmp_path / "config.yaml")
    (tmp_path / "watchdog").mkdir()
    (tmp_path / "watchdog" / "rank1.json").write_text(json.dumps({"rank": 1, "attempt": 1, "time": 0.0}))
    return tmp_path


def checkpoint(run_dir: Path, step: int, index: int) -> None:
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_text("")
    (folder / "meta.json").write_text(json.dumps({"step": step, "save_index": index}))


def begin(run_dir: Path, restart: int, first_step: int) -> None:
    (run_dir / "attempt.json").write_text(json.dumps({"job_id": "42", "restart": restart, "started": 1.0,
                                                      "first_step": first_step}))


def requeue(*args) -> tuple[bool, str]:
    outcome = lost.requeue_for_lost_rank(*args)
    return outcome.goes_on, outcome.note


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]


def test_the_first_loss_requeues_and_records_the_attempt(run_dir, asked):
    checkpoint(run_dir, 5, 0)
    begin(run_dir, 0, 0)
    requeued, how = requeue(run_dir, 1, "rank 1 on n2 was killed by SIGKILL", 0.0)
    assert (requeued, how, asked) == (True, "requeued job 42 (restart 1 of at most 5)", ["42"])
    (line,) = lines(run_dir)
    assert (line["ended"], line["lost_rank"], line["first_step"], line["last_step"]) == (
        "rank 1 on n2 was killed by SIGKILL", 1, 0, 5)
    assert line["goodput"]["steps"] == 5
    assert not (run_dir / "attempt.json").exists()  # recorded: the next attempt does not record it again
    beat = json.loads((run_dir / "watchdog" / "rank1.json").read_text())
    assert beat["ended"] == "vanished: rank 1 on n2 was killed by SIGKILL"  # its peers leave the attempt to us


def test_a_second_loss_without_a_newer_checkpoint_fails_and_says_where_to_continue(run_dir, asked, monkeypatch):
    checkpoint(run_dir, 5, 0)
    begin(run_dir, 0, 0)
    lost.requeue_for_lost_rank(run_dir, 1, "rank 1 on n2 was killed by SIGKILL", 0.0)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    begin(run_dir, 1, 5)
    requeued, how = requeue(run_dir, 1, "rank 1 on n2 was killed by SIGKILL", 0.0)
    assert not requeued and asked == ["42"], how
    assert how.startswith("not requeued: the attempt before lost a rank too, and no checkpoint newer than step 5")
    assert how.endswith("the same command continues the run from its newest checkpoint (step 5)")
    assert lines(run_dir)[-1]["requeued"] is False
    # with a checkpoint saved since, the next loss requeues again
    checkpoint(run_dir, 10, 1)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    begin(run_dir, 2, 5)
    requeued, _ = requeue(run_dir, 1, "rank 1 on n2 was killed by SIGSEGV", 0.0)
    assert requeued and asked == ["42", "42"]


def test_a_loss_during_start_up_leaves_the_older_attempts_mark(run_dir, asked, monkeypatch):
    """Rank 0 had not marked this attempt yet: the mark there is the attempt before's (killed outright), which the
    next attempt still records."""
    begin(run_dir, 0, 0)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeued, _ = requeue(run_dir, 1, "rank 1 on n2 was killed by SIGKILL", 10.0)
    (line,) = lines(run_dir)
    assert requeued and (line["restart"], line["first_step"], line["last_step"]) == (1, 0, 0)
    assert json.loads((run_dir / "attempt.json").read_text())["restart"] == 0
