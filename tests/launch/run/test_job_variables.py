"""Variables a rank reads from its environment that someone else may have set: a value that is not ours is
ignored, never a crash; and the port a Slurm job derives from its id is one no other connection may hold."""
from __future__ import annotations

import subprocess
import sys

from helpers import REPO
from launch.backends.slurm.placement import slurm_port
from launch.run.startup import ATTEMPT_START, StartupClock


def test_a_slurm_jobs_port_stays_below_the_ephemeral_range():
    ephemeral = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    assert all(1024 <= slurm_port(str(job)) < min(ephemeral, 32768) for job in range(0, 100000, 7))


def test_a_mangled_attempt_start_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv(ATTEMPT_START, "yesterday")
    assert StartupClock(tmp_path, process_start=0.0).attempt_start is None
    monkeypatch.setenv(ATTEMPT_START, "1700000000.5")
    assert StartupClock(tmp_path, process_start=0.0).attempt_start == 1700000000.5


def test_a_mangled_launcher_pid_is_ignored():
    code = "from launch.rank.parent import end_with_launcher; end_with_launcher(); print('alive')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"GPTLAUNCH_LAUNCHER_PID": "12ab", "PATH": "/usr/bin:/bin"})
    assert proc.stdout == "alive\n", proc.stderr


def test_the_start_up_line_adds_up_to_its_total_and_says_a_requeues_wait_apart():
    breakdown = {"scheduler_s": 50.8, "launcher_s": 1.2, "imports_s": 6.0, "rendezvous_s": 0.4, "health_s": 0.3,
                 "model_s": 0.5, "data_s": 0.1, "checkpoint_load_s": 2.0, "first_step_s": 6.1, "to_first_step_s": 16.6}
    line = StartupClock.describe(breakdown)
    assert line == ("start-up 16.6 s to the first step (launcher 1.2, imports 6.0, rendezvous 0.4, health 0.3, model "
                    "0.5, data 0.1, checkpoint load 2.0, first step 6.1), after 50.8 s in the scheduler since the "
                    "previous attempt")
    inside = [float(p.rsplit(" ", 1)[1]) for p in line.split("(", 1)[1].split(")")[0].split(", ")]
    assert abs(sum(inside) - breakdown["to_first_step_s"]) < 0.05
    parts = {"kernel_check_s": 0.1, "build_s": 0.2, "setup_s": 0.2}
    assert StartupClock.describe({**breakdown, **parts}).endswith(
        "previous attempt; the model's: kernel check 0.1, build 0.2, setup 0.2")
