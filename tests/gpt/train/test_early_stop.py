"""The rungs of a sweep's early stopping (gpt.train.early_stop) and its settings, without training."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gpt.config.launcher import LauncherConfig
from gpt.errors import ConfigError
from gpt.run_folder import AttemptLine
from gpt.train.early_stop import Rungs, cutoff, rung_of


def test_rungs_are_the_first_rung_times_powers_of_eta():
    assert [s for s in range(1, 200) if rung_of(s, 10, 3) is not None] == [10, 30, 90]
    assert (rung_of(10, 10, 3), rung_of(90, 10, 3), rung_of(20, 10, 3)) == (0, 2, None)


def test_a_point_goes_on_while_it_is_among_the_best_1_over_eta_of_the_others():
    assert cutoff([], 3) is None  # nothing to compare with: it goes on
    assert cutoff([2.0], 3) == 2.0  # one other: it must do as well
    assert cutoff([3.0, 1.0, 2.0], 3) == 1.0  # the best third of three: the best
    assert cutoff([4.0, 1.0, 3.0, 2.0], 3) == 2.0  # of four, the best two (rounded up)
    assert cutoff([4.0, 1.0, 3.0, 2.0], 2) == 2.0


def test_each_point_records_its_loss_at_a_rung_and_the_worse_one_stops(tmp_path: Path):
    launcher = LauncherConfig(early_stop="asha", eta=2, rung_steps=4)
    first = Rungs.of(launcher, 2, tmp_path / "sweep" / "lr=0.01")
    second = Rungs.of(launcher, 2, tmp_path / "sweep" / "lr=1e-06")
    assert first is not None and Rungs.of(LauncherConfig(), 2, tmp_path / "run") is None
    assert [s for s in range(1, 20) if first.at(s)] == [4, 8, 16]
    assert first.judge(4, 3.0) is None  # the first at its rung
    assert second.judge(4, 2.5) is None  # better than the one other
    cut = second.judge(8, 3.5) if first.judge(8, 2.0) is None else None
    assert cut is not None and (cut.step, cut.rung, cut.cutoff, cut.others) == (8, 1, 2.0, 1)
    assert cut.describe() == ("stopped early at step 8 (rung 1): val loss 3.5000, worse than 2.0000, the best 1/2 "
                              "of the 1 other point(s) at that rung (launcher.early_stop=asha)")
    assert AttemptLine(ended=cut.describe()).stopped_early
    recorded = sorted((tmp_path / "sweep" / "rungs" / "step_00000008").iterdir())
    assert [json.loads(p.read_text())["val_loss"] for p in recorded] == [2.0, 3.5]  # one file per point


def test_a_non_finite_result_ranks_last(tmp_path: Path):
    """A NaN validation loss at a rung (a point that diverged) must not make the cutoff NaN, which stopped every
    later point at that rung, the best included; a NaN point itself stops behind a finite cutoff."""
    assert cutoff([math.nan, 1.0, 2.0], 3) == 1.0
    assert cutoff([2.0, math.inf, math.nan, 1.0], 2) == 2.0
    assert cutoff([math.nan, math.nan], 2) == math.inf  # no finite result to beat: a point goes on
    launcher = LauncherConfig(early_stop="asha", eta=2, rung_steps=4)
    assert Rungs.of(launcher, 2, tmp_path / "sweep" / "diverged").judge(4, math.nan) is None  # the first
    assert Rungs.of(launcher, 2, tmp_path / "sweep" / "best").judge(4, 1.0) is None  # goes on, though after a NaN
    cut = Rungs.of(launcher, 2, tmp_path / "sweep" / "nan").judge(4, math.nan)
    assert cut is not None and cut.cutoff == 1.0


@pytest.mark.parametrize("changes, key", [({"early_stop": "hyperband"}, "launcher.early_stop"),
                                          ({"eta": 1}, "launcher.eta"),
                                          ({"rung_steps": -2}, "launcher.rung_steps")])
def test_settings_that_cannot_work_are_refused_naming_the_key(changes, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        LauncherConfig(**changes)


def test_rungs_are_evaluations():
    with pytest.raises(ConfigError, match=r"^train.eval_interval=0 is not valid: a positive number of steps with "
                                          r"launcher.early_stop=asha"):
        LauncherConfig(early_stop="asha").check_rungs(0)
    with pytest.raises(ConfigError, match=r"^launcher.rung_steps=5 is not valid: a multiple of train.eval_interval=2"):
        LauncherConfig(early_stop="asha", rung_steps=5).check_rungs(2)
    LauncherConfig(early_stop="asha", rung_steps=4).check_rungs(2)
    LauncherConfig(rung_steps=5).check_rungs(0)  # no early stopping: nothing to check


def test_the_rank_stops_at_a_rung_it_loses_but_not_at_its_last_step(tmp_path: Path):
    """StopControl.after_eval in one process: rank 0's verdict is the run's."""
    from gpt.config.sections import PreemptionConfig
    from gpt.train.stop import StopControl
    from gpt.train.summary import FitSummary

    launcher = LauncherConfig(early_stop="asha", eta=2)
    Rungs.of(launcher, 2, tmp_path / "sweep" / "best").judge(4, 1.0)
    last = StopControl(PreemptionConfig(enabled=False), Rungs.of(launcher, 2, tmp_path / "sweep" / "last"))
    assert not last.after_eval(4, 2.0, last=True) and last.reason is None  # at max_steps: finished, recorded
    worse = StopControl(PreemptionConfig(enabled=False), Rungs.of(launcher, 2, tmp_path / "sweep" / "worse"))
    assert not worse.after_eval(3, 9.0, last=False)  # no rung
    assert worse.after_eval(4, 2.0, last=False) and worse.reason == "early stop"
    summary = FitSummary()
    worse.summarise(summary, 4)
    assert summary == FitSummary(stopped_early=worse.stopped_early) and "of the 2 other point(s)" in worse.stopped_early
