"""A warmup-stable-decay run on the real local Slurm cluster (cluster=slurm): once it has decayed, the same command
with a higher train.max_steps is refused before anything is submitted, naming the stable checkpoint to branch from;
the branch, a new run from that checkpoint with the longer schedule, trains exactly the steps an uninterrupted run of
that length takes (its decay starts later; the steps before it are the stable phase's)."""
from __future__ import annotations

import json
import os

import pytest

from slurm_helpers import SLURM, TINY, output, run_launch, train_records

pytestmark = pytest.mark.slurm

WSD = [o for o in TINY if not o.startswith(("train.max_steps", "checkpoint.interval_steps"))] + [
    "strategy=single", "train.schedule=wsd", "train.decay_fraction=0.25", "checkpoint.interval_steps=4"]


def by_step(run_dir) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["lr"]) for r in train_records(run_dir)}


@pytest.mark.timeout(300)
def test_a_decayed_wsd_run_names_its_stable_checkpoint_and_the_branch_from_it_is_the_longer_run(
        slurm_cluster, tmp_path, data_overrides):
    short, branch = tmp_path / "short", tmp_path / "branch"
    proc = run_launch(slurm_cluster.env, *SLURM, *WSD, "train.max_steps=12", *data_overrides,
                      f"hydra.run.dir={short}")  # decays from step 9: checkpoints 4 and 8 are stable
    assert proc.returncode == 0, output(proc)

    longer = run_launch(slurm_cluster.env, *SLURM, *WSD, "train.max_steps=16", *data_overrides,
                        f"hydra.run.dir={short}")
    stable = short / "checkpoints" / "step_00000008"
    assert longer.returncode == 2 and "submitted job" not in longer.stdout, output(longer)
    assert f"extend or anneal from a checkpoint of its stable phase into a new run: resume={stable} run=NEW_NAME " \
           "train.max_steps=M" in longer.stderr, output(longer)

    proc = run_launch(slurm_cluster.env, *SLURM, *WSD, "train.max_steps=16", f"resume={stable}", *data_overrides,
                      f"hydra.run.dir={branch}")
    assert proc.returncode == 0, output(proc)
    threads = json.loads((branch / "environment" / "rank0.json").read_text())["threads"]  # the same sums' order
    whole = run_launch({**os.environ, "OMP_NUM_THREADS": str(threads)}, "cluster=local", *WSD, "train.max_steps=16",
                       *data_overrides, f"hydra.run.dir={tmp_path / 'whole'}")  # uninterrupted, on this machine
    assert whole.returncode == 0, output(whole)
    whole = by_step(tmp_path / "whole")
    branched = by_step(branch)
    assert sorted(branched) == list(range(9, 17)) and branched == {s: whole[s] for s in range(9, 17)}, (branched, whole)
    assert {s: whole[s] for s in range(1, 10)} == {s: v for s, v in by_step(short).items() if s <= 9}  # the stable phase
