"""The run's own groups are checked before anything runs: one line naming the key, the value and what is valid."""
from __future__ import annotations

import pytest

from gpt.errors import ConfigError
from gpt.run_config import (CheckpointConfig, DebugConfig, HealthConfig, PreemptionConfig, WatchdogConfig,
                            check_run_sections)
from helpers import compose, launch

BAD = {
    "checkpoint.keep=0": "checkpoint.keep=0 is not valid: a positive number of checkpoints to keep",
    "checkpoint.keep=abc": "checkpoint.keep='abc' is not valid",
    "checkpoint.interval_minutes=-1": "checkpoint.interval_minutes=-1 is not valid",
    "+checkpoint.every=3": "checkpoint.every=3 is not valid: known checkpoint keys are",
    "preemption.signals=[SIGKILL]": "preemption.signals='SIGKILL' is not valid",
    "preemption.max_restarts=-2": "preemption.max_restarts=-2 is not valid: an integer >= 0",
    "+preemption.retries=3": "preemption.retries=3 is not valid: known preemption keys are",
    "resume=/nonexistent": "resume='/nonexistent' is not valid: auto, none, or an existing checkpoint or run folder",
    "rendezvous.timeout_s=0": "rendezvous.timeout_s=0 is not valid",
    "debug.delay_rank=-1": "debug.delay_rank=-1 is not valid",
    "debug.signal_name=SIGFOO": "debug.signal_name='SIGFOO' is not valid",
    "+debug.hang=1": "debug.hang=1 is not valid: known debug keys are",
    "debug.hang_step=-3": "debug.hang_step=-3 is not valid",
    "watchdog.step_s=fast": "watchdog.step_s='fast' is not valid: a positive number of seconds, or auto",
    "watchdog.startup_s=0": "watchdog.startup_s=0 is not valid: a positive number of seconds",
    "watchdog.step_factor=0.5": "watchdog.step_factor=0.5 is not valid: a factor >= 1",
    "+watchdog.timeout=3": "watchdog.timeout=3 is not valid: known watchdog keys are",
    "health.action=drop": "health.action='drop' is not valid: warn or exclude",
    "health.min_fraction=1.5": "health.min_fraction=1.5 is not valid: a fraction between 0 and 1",
    "health.rounds=0": "health.rounds=0 is not valid: a number of rounds >= 1",
}


@pytest.mark.parametrize("override", BAD)
def test_bad_values_name_key_value_and_valid(override):
    with pytest.raises(ConfigError) as e:
        check_run_sections(compose(override))
    assert BAD[override] in str(e.value)


def test_defaults_pass_and_read_as_the_trainer_reads_them():
    cfg = compose()
    check_run_sections(cfg)
    assert CheckpointConfig.from_cfg(cfg) == CheckpointConfig(500, None, 3, False)
    assert PreemptionConfig.from_cfg(cfg.preemption).signals == ("SIGTERM", "SIGUSR2")
    assert DebugConfig.from_cfg(cfg.debug) == DebugConfig()
    assert WatchdogConfig.from_cfg(cfg.watchdog) == WatchdogConfig()
    assert HealthConfig.from_cfg(cfg.health) == HealthConfig()


def test_process_group_timeout_follows_the_watchdog():
    assert WatchdogConfig().process_group_timeout() == 660  # the longest default budget (startup, save) + 60 s
    assert WatchdogConfig(startup_s=30, save_s=40, eval_s=20, step_s=90).process_group_timeout() == 150
    assert WatchdogConfig(enabled=False).process_group_timeout() == 600
    assert WatchdogConfig(collective_timeout_s=77).process_group_timeout() == 77


def test_a_bad_value_stops_the_launch_before_any_rank(tmp_path, data_overrides):
    proc = launch("model=tiny", "checkpoint.keep=0", *data_overrides, run_dir=tmp_path / "run", check=False)
    assert proc.returncode == 2 and "error: checkpoint.keep=0 is not valid" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "logs").exists()
