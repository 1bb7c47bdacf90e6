"""A sweep's early stopping (launcher.early_stop=asha) on the real local Slurm cluster, packed: the points are steps of
one allocation, one at a time (each takes the node's 4 CPUs), so they reach their rungs in the sweep's order. The
learning rates' order is known from a grid (tests/launch/test_early_stop_sweep.py: 0.01 trains the tiny model
furthest in a few steps)."""
from __future__ import annotations

import json

import pytest

from slurm_helpers import SLURM, TINY, run_launch

pytestmark = pytest.mark.slurm

RUN = [o for o in TINY if not o.startswith(("train.max_steps", "train.eval_interval"))] + [
    "strategy=single", "train.max_steps=6", "train.eval_interval=2", "train.min_lr=0", "hydra.launcher.pack=true",
    "cluster.cpus_per_task=4", "train.lr=0.01,0.000001,0.003"]


def ended(point) -> list[tuple[int, str]]:
    return [(a["last_step"], a["ended"]) for a in map(json.loads, (point / "attempts.jsonl").read_text().splitlines())]


@pytest.mark.timeout(300)
def test_packed_points_worse_than_the_first_stop_at_its_rung_free_their_place_and_go_on_when_asked(
        slurm_cluster, tmp_path, data_overrides):
    sweep = tmp_path / "sweep"
    args = ("-m", *SLURM, *RUN, *data_overrides, f"hydra.sweep.dir={sweep}")
    proc = run_launch(slurm_cluster.env, *args, "launcher.early_stop=asha", "launcher.eta=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert proc.stdout.count("submitted job ") == 1 and "1 at once, 3 wave(s)" in proc.stdout, proc.stdout
    best, worst, middle = sweep / "train.lr=0.01", sweep / "train.lr=1e-06", sweep / "train.lr=0.003"
    assert ended(best) == [(6, "finished")]
    for point in (worst, middle):  # each worse than the first at step 2: stopped there, its place given to the next
        [(step, why)] = ended(point)
        assert step == 2 and why.startswith("stopped early at step 2 (rung 0): val loss "), why
        assert f"({point.name}) COMPLETED on " in proc.stdout and f"; {why}; run folder: {point}" in proc.stdout
    report = (sweep / "report" / "scaling.md").read_text()
    assert report.count("(stopped early) |") == 2, report

    again = run_launch(slurm_cluster.env, *args, "launcher.early_stop=asha", "launcher.eta=2")  # nothing to submit
    assert again.returncode == 0 and "submitted job" not in again.stdout, again.stdout + again.stderr[-3000:]
    assert again.stdout.count("stopped early at step 2 (rung 0)") == 2, again.stdout

    on = run_launch(slurm_cluster.env, *args, "launcher.early_stop=none")  # the two stopped points, in one job
    assert on.returncode == 0 and "for 2 packed point(s)" in on.stdout, on.stdout[-3000:] + on.stderr[-4000:]
    assert ended(best) == [(6, "finished")]
    assert [e[0] for e in ended(worst)] == [2, 6] and ended(worst)[-1][1] == ended(middle)[-1][1] == "finished"
