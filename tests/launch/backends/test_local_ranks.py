"""cluster=local's rank start (launch.backends.local, launch.rank.forked): ranks forked from one preloaded server per
launcher, each in a session of its own, ending with the launcher however it ends."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from helpers import REPO, launch, losses

RUN = ["model=tiny", "strategy=ddp", "nodes=2", "train.max_steps=400", "train.eval_interval=0", "train.log_interval=1",
       "checkpoint.interval_steps=10", "debug.delay_rank=0", "debug.delay_s=0.05", "train.progress=false"]


def ranks_of(launcher: psutil.Process) -> list[psutil.Process]:
    return [p for p in launcher.children(recursive=True) if p.ppid() != launcher.pid]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ranks_fork_from_one_server_in_sessions_of_their_own_and_save_when_the_launcher_is_killed(tmp_path,
                                                                                                data_overrides):
    run = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "launch", *RUN, *data_overrides, f"hydra.run.dir={run}"],
                                cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 150
        while not (run / "checkpoints" / "step_00000010").exists() and time.monotonic() < deadline:
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        me = psutil.Process(launcher.pid)
        ranks = ranks_of(me)
        servers = {r.ppid() for r in ranks}
        assert len(ranks) == 2 and len(servers) == 1, [(r.pid, r.ppid(), r.cmdline()[:3]) for r in me.children(True)]
        server = psutil.Process(servers.pop())
        assert server.ppid() == launcher.pid
        sessions = {os.getsid(p.pid) for p in (me, server, *ranks)}
        assert len(sessions) == 4, "the launcher, its server and each rank: a session each"
        os.kill(launcher.pid, signal.SIGKILL)  # no relay, no goodbye: the server ends, and each rank with it
        launcher.wait()
        gone, alive = psutil.wait_procs([server, *ranks], timeout=90)
        assert not alive, f"still running after their launcher was killed: {alive}"
        assert all(r.returncode is None or r.returncode != -signal.SIGKILL for r in ranks)
        saved = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
        assert saved[-1] > "step_00000010", saved  # they saved at their next step, as on a preemption signal
        log = (run / "logs" / "rank0.log").read_text()
        assert "checkpoint saved" in log.split("step_00000010")[-1], log[-2000:]
    finally:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(launcher.pid).children(recursive=True):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(launcher.pid, signal.SIGKILL)


@pytest.mark.parametrize("devices,visible,method", [(["/dev/nvidia0"], None, "spawn"), (["/dev/nvidia0"], "0", "spawn"),
                                                     (["/dev/nvidia0"], "", "forkserver"), ([], None, "forkserver")])
def test_with_gpus_visible_the_ranks_start_as_fresh_interpreters(monkeypatch, devices, visible, method):
    """A fork of a process that touched CUDA cannot use it: with GPUs the ranks are spawned; without (none on the
    node, or CUDA_VISIBLE_DEVICES hides them all), forked. Told without torch, which the launcher never imports."""
    import launch.local_gpus
    from launch.backends import local

    monkeypatch.setattr(launch.local_gpus.glob, "glob", lambda pattern: devices if pattern.startswith("/dev/nvidia") else [])
    monkeypatch.setattr(launch.local_gpus.os.path, "exists", lambda path: False)  # no ROCm /dev/kfd either
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert local._default_method() == method


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_spawned_ranks_train_as_forked_ones_do(tmp_path, data_overrides):
    """GPTLAUNCH_RANK_START=spawn (the start with GPUs): fresh interpreters, the same losses as forked ranks."""
    short = [o for o in RUN if not o.startswith(("train.max_steps", "debug."))] + ["train.max_steps=6"]
    forked, spawned = tmp_path / "forked", tmp_path / "spawned"
    launch(*short, *data_overrides, run_dir=forked)
    launch(*short, *data_overrides, run_dir=spawned, env={"GPTLAUNCH_RANK_START": "spawn"})
    assert losses(forked) == losses(spawned) and len(losses(forked)) == 6
    for run in (forked, spawned):
        (attempt,) = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
        assert attempt["ended"] == "finished"



@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_later_sweep_points_start_up_counts_from_its_own_ranks_start(tmp_path, data_overrides):
    """Every point's ranks fork from the server its launcher started for the first point: the second point's start-up
    budget (watchdog.startup_s) counts from its own ranks' start, not from the server's imports a point earlier. The
    first point takes longer than the budget; in the second, rank 1 hangs before its first step, which ends it."""
    startup_s = 15  # the first point's first step (its 1.5 s delay included) in well under it on a loaded machine
    proc = launch("model=tiny", "strategy=ddp", "nodes=2", "train.max_steps=12", "train.eval_interval=0",
                  "debug.delay_rank=0", "debug.delay_s=1.5", "debug.hang_rank=null,1", f"watchdog.startup_s={startup_s}",
                  "preemption.in_job_restarts=0", *data_overrides, run_dir=tmp_path, multirun=True, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    first_ended = json.loads((tmp_path / "debug.hang_rank=null" / "attempts.jsonl").read_text().splitlines()[-1])
    assert first_ended["ended"] == "finished", first_ended
    (report,) = (tmp_path / "debug.hang_rank=1").glob("hang-*.json")
    report = json.loads(report.read_text())
    assert report["budget"] == "watchdog.startup_s", report
    assert report["time"] - first_ended["time"] >= startup_s, (report["time"] - first_ended["time"], report)
    assert report["ranks"][0]["up_s"] <= report["time"] - first_ended["time"], report["ranks"][0]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_stores_port_is_held_from_its_choice_until_rank_0_serves_on_it(tmp_path, data_overrides, monkeypatch):
    """A port found free and bound later could be taken in between, by another run's store or any program: the
    launcher binds the port as it chooses it, and rank 0's store serves on that socket. A squatter that tries to take
    the port just before the ranks start cannot, and the run trains."""
    from launch.backends import local

    tried, start = [], local.RankStarter.run

    def squat_then_start(self, run_dir, envs, *rest):
        squatter = socket.socket()
        try:
            squatter.bind(("127.0.0.1", int(envs[0]["MASTER_PORT"])))
            squatter.listen()
            tried.append("taken")
        except OSError:
            tried.append("refused")
        try:
            return start(self, run_dir, envs, *rest)
        finally:
            squatter.close()

    monkeypatch.setattr(local.RankStarter, "run", squat_then_start)
    proc = launch("model=tiny", "strategy=ddp", "nodes=2", "train.max_steps=2", "train.eval_interval=0",
                  "checkpoint.interval_steps=0", *data_overrides, run_dir=tmp_path, check=False)
    assert tried == ["refused"] and proc.returncode == 0, (tried, proc.stderr[-3000:])
