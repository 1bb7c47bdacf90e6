"""Planning's time-limit check on cluster=slurm: a limit that leaves an attempt too little to train (Slurm may send
its warning up to 60 s early, and start-up comes first), and a run that needs more allocations at that limit than
preemption.max_restarts allows, are each one warning line that says what would work."""
from __future__ import annotations

import json
import logging

from hydra import compose, initialize_config_dir

from gpt.run_folder import STEP_COUNTS, RunFolder
from launch import launch_config
from launch.backends.slurm.backend import SlurmBackend
from launch.planning.time_limit import PRIOR_STARTUP_S, AttemptTimes, attempt_times, check_time_limit
from helpers import REPO

FIRST = AttemptTimes(PRIOR_STARTUP_S, "a prior until the run has started once", None, 1500)


def slurm_cfg(*overrides: str):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return launch_config.parse(compose("config", overrides=["cluster=slurm", *overrides]))


def lines(*overrides: str, times: AttemptTimes = FIRST) -> list[str]:
    return SlurmBackend().time_limit_lines(slurm_cfg(*overrides), times)


def test_a_minute_with_a_30_s_warning_leaves_no_time_to_train_and_says_what_would():
    """The fault a user met: the warning came 14-17 s into attempts of a minute, which trained 1 and 9 steps, and
    11 attempts used up preemption.max_restarts=10 at step 849 of 1500."""
    short, total = lines("cluster.time_min=1", "cluster.signal_delay_s=30", "preemption.max_restarts=10")
    assert short == ("cluster.time_min=1 leaves as little as 0 s of an attempt to train: Slurm may send the warning "
                     "(cluster.signal_delay_s=30) up to 60 s earlier than asked, and start-up takes about 30 s (a prior "
                     "until the run has started once); what would work: cluster.time_min=4 or more"), short
    assert total == ("the job stops after 11 allocation(s) of cluster.time_min=1 (preemption.max_restarts=10): about "
                     "0.0 min of training in all"), total


def test_the_defaults_say_nothing():
    assert lines("cluster.time_min=10") == [] and lines("cluster.time_min=60") == []
    assert lines("cluster.time_min=1", "cluster.signal_delay_s=0") == []  # no warning: the limit kills


def test_a_measured_step_time_counts_the_allocations_the_steps_left_need():
    """10 min, the warning 120 s (+30 s) before, 30 s of start-up: 420 steps of 1 s an attempt; 15000 steps need 36
    allocations, 11 allowed."""
    measured = AttemptTimes(30.0, "measured over 2 attempt(s)", 1.0, 15000)
    (line,) = lines("cluster.time_min=10", "preemption.max_restarts=10", times=measured)
    assert line == ("at cluster.time_min=10 an attempt trains about 420 steps (1 s a step, measured): the 15000 "
                    "steps left need about 36 allocations, more than the 11 that preemption.max_restarts=10 allow, "
                    "and the run would stop about 10380 steps short; what would work: cluster.time_min=26 or "
                    "preemption.max_restarts=35"), line
    assert lines("cluster.time_min=10", "preemption.max_restarts=40", times=measured) == []


def test_the_run_folder_gives_the_measured_start_up_step_time_and_steps_left(tmp_path):
    folder = RunFolder(tmp_path)
    assert attempt_times(tmp_path, 1500) == FIRST
    folder.metrics.mkdir()
    for startup_s in (12.0, 17.0, 15.0):
        folder.attempts.append("7", 0, {"ended": "preempted:SIGUSR2", "goodput": {"allocated_s": 60.0,
                                                                                 "startup_s": startup_s}})
    folder.metrics_file(0).write_text("".join(json.dumps({"kind": "train", "step": s, STEP_COUNTS: "done",
                                                          "step_time_s": 0.2}) + "\n" for s in range(1, 10)))
    assert attempt_times(tmp_path, 1500) == AttemptTimes(15.0, "measured over 3 attempt(s)", 0.2, 1500)


def test_planning_logs_each_line_as_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="launch.planning.time_limit"):
        check_time_limit(slurm_cfg("cluster.time_min=1", "cluster.signal_delay_s=30"), tmp_path, SlurmBackend())
    assert [r.message.split(":")[0] for r in caplog.records] == [
        "cluster.time_min=1 leaves as little as 0 s of an attempt to train", "the job stops after 11 allocation(s) of "
        "cluster.time_min=1 (preemption.max_restarts=10)"], caplog.text
