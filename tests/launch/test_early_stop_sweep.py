"""A sweep's early stopping on this machine (launcher.early_stop=asha): the points run one after another, so the
first goes on at every rung and each later one is compared with those before it. The learning rates' order is
known from a grid (0.01 trains the tiny model furthest in a few steps, 1e-6 hardly at all)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import launch, losses

RUN = ["model=tiny", "strategy=single", "train.max_steps=6", "train.eval_interval=2", "train.log_interval=1",
       "train.warmup_steps=2", "train.min_lr=0", "checkpoint.interval_steps=0"]
ASHA = ["launcher.early_stop=asha", "launcher.eta=2"]


def ended(point: Path) -> list[tuple[int, str]]:
    return [(a["last_step"], a["ended"]) for a in map(json.loads, (point / "attempts.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_the_worse_points_stop_at_the_first_rung_stay_stopped_and_go_on_when_asked(tmp_path: Path, data_overrides):
    sweep = tmp_path / "sweep"
    lrs = "train.lr=0.01,0.000001,0.003"
    proc = launch(*RUN, *ASHA, lrs, *data_overrides, run_dir=sweep, multirun=True)
    best, worst, middle = sweep / "train.lr=0.01", sweep / "train.lr=1e-06", sweep / "train.lr=0.003"
    assert ended(best) == [(6, "finished")]
    for point, others in ((worst, 1), (middle, 2)):  # each worse than the first at step 2
        [(step, why)] = ended(point)
        assert step == 2 and why.startswith("stopped early at step 2 (rung 0): val loss ") and (
            f"the best 1/2 of the {others} other point(s) at that rung (launcher.early_stop=asha)") in why, why
        assert json.loads((point / "summary.json").read_text())["stopped_early"] == why
        assert f"run {why}" in proc.stderr
    report = (sweep / "report" / "scaling.md").read_text()
    assert "| 2 (stopped early) |" in report and f"- train.lr=1e-06: {ended(worst)[0][1]}" in report, report

    again = launch(*RUN, *ASHA, lrs, *data_overrides, run_dir=sweep, multirun=True)  # the same command: all done
    said = again.stdout + again.stderr
    assert "continuing" not in said and said.count("stopped early at step 2 (rung 0)") == 2, said
    status = launch_status(sweep)
    assert "train.lr=1e-06: no job, step 2/6" in status and status.count("stopped early at step 2 (rung 0)\n") == 2

    launch(*RUN, "launcher.early_stop=none", lrs, *data_overrides, run_dir=sweep, multirun=True)  # train them on
    assert ended(best) == [(6, "finished")]
    assert [step for step, _ in ended(worst)] == [2, 6] and ended(worst)[-1][1] == "finished"
    assert ended(middle)[-1] == (6, "finished")
    alone = tmp_path / "alone"  # a stopped point went on exactly: as the same run never stopped
    launch(*RUN, "train.lr=0.003", *data_overrides, run_dir=alone)
    assert losses(middle) == losses(alone) and len(losses(alone)) == 6


@pytest.mark.slow
def test_a_single_run_has_nothing_to_compare_with(tmp_path: Path, data_overrides):
    proc = launch(*RUN, *ASHA, *data_overrides, run_dir=tmp_path / "run", check=False)
    assert proc.returncode == 2 and "launcher.early_stop='asha' is not valid: none for a single run: early stopping " \
        "compares the points of a sweep (python -m launch -m ...)" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def launch_status(sweep: Path) -> str:
    import subprocess
    import sys

    from helpers import REPO

    proc = subprocess.run([sys.executable, "-m", "launch.status", str(sweep)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout
