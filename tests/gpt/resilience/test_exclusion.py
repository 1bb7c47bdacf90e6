"""Removing a straggler's host pays when its cost over the remaining steps exceeds a save and a restart."""
from __future__ import annotations

from gpt.resilience.exclusion import PRIOR_RESTART_S, decide, restart_cost
from gpt.resilience.stragglers import StragglerEvent
from gpt.run_folder import AttemptLine

EVENT = StragglerEvent(step=20, rank=1, host="gl-n2", kind="straggler", lag_pct=300.0, busy_s=0.4, median_s=0.1,
                       windows=3)


def test_a_long_remaining_run_pays_for_the_restart():
    d = decide(EVENT, 0.1, remaining_steps=1000, save_s=0.5, attempts=[])
    assert d.pays and round(d.keep_s) == 300 and d.leave_s == 0.5 + PRIOR_RESTART_S
    assert d.message() == ("straggler: excluding gl-n2 (rank 1) at step 20: keeping it costs 300 s (300 ms x 1000 "
                           "steps left), removing it 60 s (a save 0.5 s + a restart 60 s, a prior until this run "
                           "has restarted)")


def test_a_short_remaining_run_keeps_the_node_and_says_why():
    d = decide(EVENT, 0.1, remaining_steps=50, save_s=0.5, attempts=[])
    assert not d.pays
    assert d.message().startswith("straggler: keeping gl-n2 (rank 1): it does not pay; keeping it costs 15 s")


def test_the_restart_cost_is_measured_once_the_run_has_restarted():
    attempts = [{"restart": 0, "startup": {"to_first_step_s": 30.0}},
                {"restart": 1, "startup": {"to_first_step_s": 9.0, "scheduler_s": 7.0}}]
    assert restart_cost([AttemptLine.from_json(a) for a in attempts]) == (16.0, "measured over 1 restart(s)")


def test_a_rank_still_slow_after_two_of_its_hosts_were_excluded_keeps_its_host():
    """The slowness follows the rank, not the host: a third exclusion would change nothing but cost a restart."""
    excluded = [AttemptLine.from_json({"ended": "preempted:straggler", "straggler": {"rank": r, "host": h}})
                for r, h in ((1, "gl-n2"), (0, "gl-n1"), (1, "gl-n4"))]
    once = decide(EVENT, 0.1, remaining_steps=1000, save_s=0.5, attempts=excluded[:2])
    assert once.pays and not once.kept
    d = decide(EVENT, 0.1, remaining_steps=1000, save_s=0.5, attempts=excluded)
    assert not d.pays
    assert d.message().startswith("straggler: keeping gl-n2 (rank 1), training goes on: rank 1 stayed slow after "
                                  "gl-n2, gl-n4 were excluded: the slowness follows the rank, not the host; keeping "
                                  "it costs 300 s")


def test_a_host_the_scheduler_cannot_spare_is_kept_before_any_rank_stops(tmp_path):
    """Rank 0 asks the scheduler before every rank saves and stops: a straggler no requeue could leave out is
    trained on with, said in one line."""
    from types import SimpleNamespace

    from gpt.train.reporter import StepReporter

    reporter = StepReporter.__new__(StepReporter)
    reporter.stragglers = SimpleNamespace(config=SimpleNamespace(action="exclude"))
    reporter.spent = SimpleNamespace(saves=0, save_s=0.0)
    reporter.train = SimpleNamespace(max_steps=1020)
    reporter.shape = SimpleNamespace(run_dir=tmp_path)
    reporter.env = SimpleNamespace(is_main=True)
    reporter.exclusion, asked = None, []
    reporter.cannot_spare = lambda host: asked.append(host) or "partition debug cannot spare it"
    reporter.consider_exclusion(20, SimpleNamespace(events=[EVENT]))
    assert reporter.exclusion is None and asked == ["gl-n2"]
