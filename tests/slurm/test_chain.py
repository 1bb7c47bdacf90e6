"""cluster.chain=N on the real local Slurm cluster: N jobs with one name and --dependency=singleton, each stopped by
its time limit's warning (Slurm's own --signal, sent up to 30 s late: Slurm checks time limits every 30 s), each
continuing the run where the one before saved; one run, bitwise equal to an uninterrupted one."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import wait_until
from launch.backends.slurm.chain import next_link
from slurm_helpers import REPO, SLURM, TINY, launch_cmd, output, run_launch
from test_detached import steps_done, verb
from test_preemption import RUN, STEPS, assert_same_run, attempts

pytestmark = pytest.mark.slurm

# 1-minute jobs warned 10 s ahead: Slurm checks time limits every 30 s, so the warning comes 20 to 50 s after a link
# starts, and with about 16 s of start-up here a link trains 4 to 34 s. 80 steps of about 0.58 s (46 s) are more than
# one link trains: the first link always hands over; the second hands over or finishes the run; the third continues,
# finds the run done, or (the last link) requeues itself, once a minute until the run is done: on a slower machine
# (longer start-up, slower steps) that is a few more minutes, which the timeout allows (the reference run, a fixture,
# counts toward it too).
CHAIN = ["nodes=2", *SLURM, *RUN, "cluster.chain=3", "cluster.time_min=1", "cluster.signal_delay_s=10",
         "debug.delay_s=0.5"]


@pytest.fixture
def reference(reference_run, data_overrides) -> Path:
    return reference_run(*RUN, *data_overrides)


@pytest.mark.timeout(720)
def test_a_chain_of_time_limited_jobs_is_one_run_equal_to_an_uninterrupted_one(slurm_cluster, tmp_path,
                                                                                data_overrides, reference):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = run_launch(slurm_cluster.env, *CHAIN, *data_overrides, f"hydra.run.dir={run_dir}", timeout=600)
    print(f"a chain of 3 one-minute jobs took {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, output(proc)
    record = json.loads((run_dir / "slurm_job.json").read_text())
    links = record["chain"]
    assert len(links) == 3 and record["job_id"] == links[-1], record
    assert f"submitted jobs {' '.join(links)} (one after another)" in proc.stdout, output(proc)
    jobs = [slurm_cluster.job_info(j) for j in links]
    assert len({j["JobName"] for j in jobs}) == 1, jobs
    log = attempts(run_dir)
    for job in jobs:  # each link ends before its limit, but one whose start-up took most of its minute (a slower
        # machine) is warned before or just after its first step, and its save may outrun the minute
        start = max((a.get("startup", {}).get("to_first_step_s", math.inf) for a in log if a["job_id"] == job["JobId"]),
                    default=0.0)
        assert job["JobState"] == "COMPLETED" or job["JobState"] == "TIMEOUT" and start > 30, (start, jobs)
    assert all(j["Restarts"] == "0" for j in jobs[:-1]), jobs  # no earlier link requeued itself: the next continued
    assert all(a["EndTime"] <= b["StartTime"] for a, b in zip(jobs, jobs[1:])), jobs  # one after another

    assert_same_run(run_dir, reference)
    assert [a["job_id"] for a in log[:3]] == links and {a["job_id"] for a in log[3:]} <= {links[2]}, log
    for a, nxt in zip(log, links[1:]):  # each earlier link's one attempt hands over, or finishes the run
        if a["ended"] != "finished":
            assert a["ended"] == "preempted:time limit" and a["requeued"] is False and a["next_link"] == nxt, log
            assert f"job {nxt}, the chain's next link, continues the run" in a["note"], a
    assert "next_link" in log[0], log
    assert all(a["requeued"] for a in log[3:-1] if a["ended"] != "finished"), log  # the last link requeues itself
    assert log[-1]["ended"] == "finished" and log[-1]["last_step"] == STEPS, log
    assert all(b["first_step"] == a["last_step"] for a, b in zip(log, log[1:])), log  # each resumed at the save
    print(f"steps per attempt: {[a['last_step'] - a['first_step'] for a in log]}")
    finished = [x for x in (run_dir / "logs" / "rank0.log").read_text().splitlines() if "run finished:" in x][-1]
    assert f"allocated over {len(log)} attempt(s)" in finished, finished  # goodput: one run across the links

    status = subprocess.run([sys.executable, "-m", "launch.status", str(run_dir)], cwd=REPO, env=slurm_cluster.env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"(chain: {', '.join(f'{j} COMPLETED' for j in links)})" in status.stdout, status.stdout
    restarts = sum(1 for a in log if a.get("requeued"))
    assert f"{len(log)} attempt(s), {restarts} restart(s)" in status.stdout, status.stdout


def test_a_link_hands_over_only_to_a_later_link_still_queued(slurm_cluster, tmp_path, monkeypatch):
    """Which way a link's time-limit save goes (launch.backends.slurm.chain.next_link): to the first later link
    Slurm still holds, else (the last link, a chain whose later links were cancelled, no chain) a requeue."""
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    script = "#!/bin/bash\ntrue\n"
    first, second, third = (slurm_cluster.sbatch(script, "--hold", "--job-name=link") for _ in range(3))
    try:
        record = tmp_path / "slurm_job.json"
        record.write_text(json.dumps({"job_id": third, "chain": [first, second, third]}))
        assert next_link(tmp_path, first) == second and next_link(tmp_path, second) == third
        assert next_link(tmp_path, third) is None and next_link(tmp_path, "999999") is None
        slurm_cluster.run("scancel", second)
        slurm_cluster.wait_state(second)
        assert next_link(tmp_path, first) == third  # a cancelled link is skipped
        slurm_cluster.run("scancel", third)
        slurm_cluster.wait_state(third)
        assert next_link(tmp_path, first) is None  # nothing left to continue the run: the link requeues itself
        record.write_text(json.dumps({"job_id": first}))
        assert next_link(tmp_path, first) is None
    finally:
        slurm_cluster.run("scancel", first, second, third, check=False)


@pytest.mark.timeout(180)
def test_a_detached_chain_shows_its_links_and_cancel_saves_and_stops_every_link(slurm_cluster, tmp_path,
                                                                                 data_overrides):
    run_dir = tmp_path / "run"
    proc = run_launch(slurm_cluster.env, "nodes=2", *SLURM, *RUN, *data_overrides, "cluster.chain=3",
                      "hydra.launcher.detach=true", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, output(proc)
    links = json.loads((run_dir / "slurm_job.json").read_text())["chain"]
    assert f"detached: job(s) {' '.join(links)} accepted" in proc.stdout, output(proc)
    assert all(slurm_cluster.job_info(j)["Dependency"] == "singleton(unfulfilled)" for j in links[1:])
    wait_until(lambda: steps_done(run_dir) > 0, what="the first link's first step")

    status = verb(slurm_cluster.env, "status", str(run_dir))
    assert status.returncode == 3, output(status)  # still running
    assert f"job {','.join(links)} RUNNING (chain: {links[0]} RUNNING, {links[1]} PENDING, {links[2]} PENDING)" \
        in status.stdout, output(status)

    cancel = verb(slurm_cluster.env, "cancel", str(run_dir))
    assert cancel.returncode == 0, output(cancel)
    # the running link saved and stopped (COMPLETED when it ended before the cancel's last scancel); the later ones
    # never started
    states = [slurm_cluster.wait_state(j) for j in links]
    assert states[0] in ("CANCELLED", "COMPLETED") and states[1:] == ["CANCELLED"] * 2, states
    [attempt] = attempts(run_dir)  # the user's cancel: neither requeued nor handed to the next link
    assert attempt["job_id"] == links[0] and attempt["ended"] == "cancelled by the user", attempt
    assert not attempt.get("requeued") and "next_link" not in attempt, attempt


@pytest.mark.timeout(120)
def test_an_interrupted_waiting_launcher_names_every_link(slurm_cluster, tmp_path, data_overrides):
    run_dir, errors = tmp_path / "run", tmp_path / "err"
    with errors.open("w") as err_file:  # progress=true: the waiter's status lines say it is waiting
        long = [o for o in TINY if not o.startswith("train.max_steps")] + ["train.max_steps=2000"]  # still running
        # a foreground launcher, as on a terminal: a shell that ran the tests in the background (`make test &`)
        # left SIGINT ignored, which a Python child keeps (it then has no KeyboardInterrupt)
        proc = subprocess.Popen(launch_cmd("nodes=1", *SLURM, *long, *data_overrides, "cluster.chain=2",
                                           "hydra.launcher.progress=true", f"hydra.run.dir={run_dir}"), cwd=REPO,
                                env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=err_file, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # not a fixed sleep: on a loaded machine the launcher may still be between submitting and waiting
        # the chain's first link running (the launcher's steady wait)
        wait_until(lambda: "jobs: 0 of 1 done, 1 running" in errors.read_text(), what="the launcher waiting on the chain")
        links = json.loads((run_dir / "slurm_job.json").read_text())["chain"]
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
        err = errors.read_text()
        assert proc.returncode == 130, out + err
        assert f"job(s) {' '.join(links)} keep running" in err and f"scancel {' '.join(links)};" in err, err
    finally:
        proc.kill()
        slurm_cluster.run("scancel", *json.loads((run_dir / "slurm_job.json").read_text()).get("chain", []),
                          check=False)
