"""Ctrl-C in a local run: every rank saves at the next step and stops, with one line naming the command that
continues the run, and no traceback; that command continues it bitwise."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, launch, losses
from gpt.resilience.goodput import interruption_rate, run_goodput
from gpt.run_folder import RunFolder

RUN = ["model=tiny", "nodes=2", "strategy=ddp", "train.max_steps=60", "train.log_interval=1",
       "train.eval_interval=0", "checkpoint.interval_steps=1000", "debug.delay_rank=0", "debug.delay_s=0.05",
       "train.progress=false"]


def interrupted(run: Path, overrides: list[str], after: int, signum: int) -> tuple[subprocess.Popen, str]:
    """A local run in its own process group, sent `signum` once rank 0 logged `after` steps; (it, its stderr)."""
    cmd = [sys.executable, "-m", "launch", *overrides, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = run / "metrics" / "rank0.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= after) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signum)
    return proc, proc.communicate(timeout=120)[1]


@pytest.mark.slow
def test_ctrl_c_saves_stops_and_the_printed_command_continues(tmp_path, data_overrides):
    reference, run = tmp_path / "reference", tmp_path / "run"
    launch(*RUN, *data_overrides, run_dir=reference)
    proc, err = interrupted(run, [*RUN, *data_overrides], 10, signal.SIGINT)  # what a terminal sends
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    stopped_at = len(losses(run))
    assert 10 <= stopped_at < 60 and (run / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").is_file()
    line = RunFolder(run).attempts.read()[-1]
    assert line.ended == "Ctrl-C" and not line.requeued, line  # the user stopped it: no preemption, no fault
    assert run_goodput([line]).describe().endswith("interruptions: Ctrl-C")
    assert interruption_rate([line])[1].startswith("no interruption seen yet")  # it sets no checkpoint interval
    again = err.split("Continue with:\n", 1)[1].splitlines()[0].strip()
    assert again.startswith("python -m launch ") and f"hydra.run.dir={run}" in again
    resumed = subprocess.run([sys.executable, *shlex.split(again)[1:]], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run) == losses(reference)  # every step once, bitwise


@pytest.mark.slow
def test_ctrl_c_twice_before_the_first_checkpoint_says_so_and_counts_the_attempt(tmp_path, data_overrides):
    """The second Ctrl-C stops the ranks at once (inside the first's save here): no checkpoint is kept, and the
    line says the same command starts over, not that a checkpoint is. The attempt's line says Ctrl-C, with its time
    and its steps (lost once the next attempt trains them again), not "killed outright" with nothing allocated."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch", *RUN, *data_overrides, "debug.save_sleep_s=60", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics" / "rank0.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 5) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(3)  # the ranks reached the save, which sleeps
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 2, err[-3000:]
    assert "stopped at once (Ctrl-C twice), before its first checkpoint: the same command starts it over" in err, \
        err[-3000:]
    line = RunFolder(run).attempts.read()[-1]
    assert line.ended == "Ctrl-C" and not line.requeued, line
    assert run_goodput([line]).allocated_s > 3 and line.goodput["steps"] >= 5, line  # lost once trained again


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_stops_like_ctrl_c(tmp_path, data_overrides):
    """`kill -TERM -PGID` (a process manager, a closed terminal) ends as Ctrl-C does: saved, one line, no Hydra
    'Error executing job' and no traceback."""
    run = tmp_path / "run"
    proc, err = interrupted(run, [*RUN, *data_overrides], 5, signal.SIGTERM)
    assert proc.returncode == 2, err[-3000:]
    assert "Error executing job" not in err and "Traceback" not in err, err[-3000:]
    assert "SIGTERM: every rank saves at its next step, then stops" in err, err[-3000:]
    stopped_at = len(losses(run))
    assert (run / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").is_file(), err[-3000:]
    assert "Continue with:\n  python -m launch " in err


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_ctrl_z_pauses_the_ranks_and_the_launcher_and_sigcont_resumes_them(tmp_path, data_overrides):
    """SIGTSTP to the launcher's process group (Ctrl-Z) stops every rank (they run in sessions of their own) and
    the launcher; SIGCONT resumes them, and the pause, longer than the step budget, is no hang. A plain SIGSTOP to
    the group, which the launcher cannot catch, stops the ranks too (each sees its launcher stopped)."""
    import psutil

    run = tmp_path / "run"
    overrides = [*RUN, "train.max_steps=150", "watchdog.step_s=8", *data_overrides, f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, "-m", "launch", *overrides], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics" / "rank0.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 10) and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.1)
    ranks = [psutil.Process(json.loads((run / "environment" / f"rank{r}.json").read_text())["pid"]) for r in (0, 1)]
    processes = [psutil.Process(proc.pid), *ranks]

    def paused(signum: int, seconds: float) -> int:
        """`signum` to the group: every process stops, and no step is logged for `seconds`; the steps logged."""
        os.killpg(proc.pid, signum)
        deadline = time.monotonic() + 10
        while any(p.status() != psutil.STATUS_STOPPED for p in processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p.status() for p in processes] == [psutil.STATUS_STOPPED] * 3, signal.Signals(signum).name
        paused_at = metrics.read_text().count("\n")
        time.sleep(seconds)
        assert metrics.read_text().count("\n") == paused_at and paused_at < 150
        os.killpg(proc.pid, signal.SIGCONT)
        return paused_at

    at = paused(signal.SIGTSTP, 20)  # past watchdog.step_s, and past its own sleep by more than FROZEN_S
    while metrics.read_text().count("\n") < at + 5:  # resumed
        time.sleep(0.1)
    paused(signal.SIGSTOP, 2)
    err = proc.communicate(timeout=180)[1]
    assert proc.returncode == 0, err[-3000:]
    assert len(losses(run)) == 150 and not list(run.glob("hang-*")), err[-3000:]


@pytest.mark.slow
def test_ctrl_c_twice_inside_a_save_stops_and_no_rank_restarts_the_run(tmp_path, data_overrides):
    """Two Ctrl-C half a second apart inside a save: the rank that took both stops at once, and a peer that took
    them as one sees it vanish. That is the user's stop, not a hang: no hang report, no new round, the attempt
    recorded as Ctrl-C, and the command that continues printed clean."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch", *RUN, *data_overrides, "checkpoint.interval_steps=5", "debug.save_sleep_s=10",
           "debug.save_sleep_step=5", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE, text=True)
    err = ""
    while "sleeping 10.0 s inside the save of step 5" not in err:
        line = proc.stderr.readline()
        assert line, err[-3000:]
        err += line
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)  # what the user did; the outcome must not depend on it
    os.killpg(proc.pid, signal.SIGINT)
    err += proc.communicate(timeout=120)[1]
    assert proc.returncode == 2, err[-3000:]
    assert "restarting inside the allocation" not in err and not list(run.glob("hang-*")), err[-3000:]
    again = err.split("stopped at once (Ctrl-C twice)", 1)[1].split(":\n  ", 1)[1].splitlines()[0]
    assert again.endswith(f"hydra.run.dir={run}"), again
    (line,) = RunFolder(run).attempts.read()
    assert line.ended == "Ctrl-C" and not line.requeued, line


def started_up_to_its_rank_server(run: Path, overrides: list[str]) -> subprocess.Popen:
    """A local run in its own process group, once its launcher started the server its ranks fork from: it relays
    signals from then on, and the server's imports take seconds before any rank runs."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "launch", *overrides, f"hydra.run.dir={run}"], cwd=REPO,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    launcher = psutil.Process(proc.pid)
    while not any("forkserver" in " ".join(p.cmdline()) for p in launcher.children()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_ctrl_c_while_the_ranks_start_stops_the_run_at_its_first_step(tmp_path, data_overrides):
    """The ranks cannot take a signal in their start-up: the launcher holds the Ctrl-C until each can."""
    run = tmp_path / "run"
    proc = started_up_to_its_rank_server(run, [*RUN, *data_overrides])
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=180)[1]
    assert proc.returncode == 2, err[-3000:]
    assert "Continue with:\n  python -m launch " in err and "Traceback" not in err, err[-3000:]
    assert len(losses(run)) == 1, err[-3000:]
    (line,) = RunFolder(run).attempts.read()
    assert line.ended == "Ctrl-C" and not line.requeued, line


@pytest.mark.slow
def test_ctrl_c_twice_while_the_ranks_start_stops_them_at_once(tmp_path, data_overrides):
    run = tmp_path / "run"
    proc = started_up_to_its_rank_server(run, [*RUN, *data_overrides])
    os.killpg(proc.pid, signal.SIGINT)
    err = ""
    while "SIGINT: every rank saves at its next step" not in err:  # the launcher took the first
        line = proc.stderr.readline()
        assert line, err[-3000:]
        err += line
    os.killpg(proc.pid, signal.SIGINT)
    err += proc.communicate(timeout=180)[1]
    assert proc.returncode == 2, err[-3000:]
    assert "stopped at once (Ctrl-C twice)" in err and "Traceback" not in err, err[-3000:]
    assert not (run / "checkpoints").is_dir() or not list((run / "checkpoints").glob("step_*")), err[-3000:]
