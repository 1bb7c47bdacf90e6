"""Planning's save-time check: a save estimated from the bytes per rank and the run's last measured rate, against a
preemption's grace time and the time-limit warning's lead; one line each where it does not fit, saying what would."""
from __future__ import annotations

import json

from gpt.checkpoint.store import SAVE_RATE
from launch.planning.save_time import DEFAULT_RATE, SaveCost, save_cost, unfit_saves

GRACE = (20, "partition low: PreemptMode=REQUEUE, GraceTime=20 s")


def test_a_save_longer_than_the_grace_time_is_said_with_what_would_fit():
    llama_1b = SaveCost(12e9, 0.5e9, "measured at step 100's save")  # 24 s, as its final save took on an H200
    [line] = unfit_saves(llama_1b, GRACE, None, async_save=False)
    assert line.startswith("a checkpoint save takes about 24.0 s here (12.00 GB per rank at 0.50 GB/s, measured at "
                           "step 100's save), about 36 s with the step under way, longer than the 20 s a preemption "
                           "leaves (partition low: PreemptMode=REQUEUE, GraceTime=20 s)"), line
    assert "fewer bytes per rank" in line and "checkpoint.async=true with a shorter checkpoint" in line
    [line] = unfit_saves(llama_1b, GRACE, None, async_save=True)
    assert "(a shorter checkpoint.interval_minutes)" in line
    # at the staged path's target (6 s, 2 GB/s) it fits, and a backend that is not preempted says no grace time
    assert unfit_saves(SaveCost(12e9, 2e9, "measured"), GRACE, None, async_save=False) == []
    assert unfit_saves(llama_1b, None, None, async_save=False) == []


def test_a_time_limit_warning_too_close_for_the_save_names_an_earlier_signal():
    cost = SaveCost(12e9, 0.5e9, "measured")
    [line] = unfit_saves(cost, None, 30, async_save=False)
    assert line.startswith("cluster.signal_delay_s=30 may be too short") and line.endswith(
        "an earlier signal, cluster.signal_delay_s=90"), line  # 2 x (24 s + 10 s for the requeue) = 68 s
    assert unfit_saves(cost, None, 120, async_save=False) == []


def test_the_rate_is_the_newest_checkpoints_and_a_default_before_one(tmp_path):
    run_dir = tmp_path / "run"
    before = save_cost(1e9, run_dir, extra_s=25)
    assert before.rate == DEFAULT_RATE and before.seconds == 1e9 / DEFAULT_RATE + 25
    for index, (step, rate) in enumerate([(4, 3e8), (8, 2e9)]):  # as Checkpointer commits them (store.save_cost)
        folder = run_dir / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / ".metadata").write_bytes(b"")
        (folder / "meta.json").write_text(json.dumps({"step": step, "save_index": index, SAVE_RATE: rate}))
    after = save_cost(1e9, run_dir)
    assert after.source == "measured at step 8's save" and after.rate == 2e9 and after.seconds == 0.5
