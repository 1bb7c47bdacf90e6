"""The run folder's lease (gpt.resilience.lease, launch.run.take_lease) on real files and real processes: one writer
at a time, a fresh beat always vetoes a take-over, and a displaced holder that wakes up stops without writing. The
scheduler's answer is a plain function here (the Slurm tests ask the real one)."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gpt.errors import UserError
from launch.backends.job_state import JobStanding, JobState
from gpt.resilience.lease import Lease, generation, read_beat
from gpt.resilience.timing import LEASE_BEAT_S, LEASE_STALE_S
from helpers import REPO, wait_until
from launch.backends.slurm.commands import JobInfo, standing
from launch.run.take_lease import check_free, take_lease

# A holder in its own process: takes the lease (beating every 0.2 s), then writes a line into the folder every
# 0.1 s, each behind the fence, until it is stopped.
HOLDER = """
import sys, time
from pathlib import Path
from gpt.resilience.lease import fence, install_fence
from launch.run.take_lease import take_lease
run = Path(sys.argv[1])
lease = take_lease(run, sys.argv[2] or None, int(sys.argv[3]), stale_s=1)
lease.start(beat_s=0.2)
install_fence(run, lease.generation)
print(lease.generation, flush=True)
while True:
    checked = time.time()  # a write is stamped with when its fence check began: frozen after the check passed,
    fence()                # it still writes once when it wakes, stamped before the take-over
    with open(run / "writes", "a") as f:
        f.write(f"{checked}\\n")
    time.sleep(0.1)
"""


def holder(run: Path, job: str = "", restart: int = 0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), job, str(restart)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip(), proc.stderr.read()  # it holds the lease
    while not (run / "writes").exists():  # and writes
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def said(word: str):
    """The scheduler's answer about any job, in Slurm's word (the lease decides on its neutral state)."""
    return lambda job: standing(JobInfo(job, word))


def test_two_processes_racing_for_one_generation_one_wins(tmp_path):
    """Eight processes claim generation 1 at the same instant: exactly one holds it."""
    go = time.time() + 1.5
    race = ("import sys, time\nfrom pathlib import Path\nfrom gpt.resilience.lease import Lease, LeaseLost\n"
            f"time.sleep(max({go} - time.time(), 0))\n"
            "try:\n    Lease.take(Path(sys.argv[1]), 0, None, 0)\nexcept LeaseLost:\n    sys.exit(3)\n")
    procs = [subprocess.Popen([sys.executable, "-c", race, str(tmp_path)], cwd=REPO) for _ in range(8)]
    codes = sorted(p.wait() for p in procs)
    assert codes == [0] + [3] * 7
    assert generation(tmp_path) == 1 and read_beat(tmp_path).generation == 1


def test_a_fresh_beat_vetoes_a_take_over_even_from_the_same_job(tmp_path):
    """Two launches inside one allocation share the job id: the second is refused while the first beats."""
    first = holder(tmp_path, job="7")
    try:
        started = time.monotonic()
        with pytest.raises(UserError, match=r"in use by another run \(job 7, restart 0, pid \d+ .*lease is beating"):
            take_lease(tmp_path, "7", 0, said("RUNNING"), stale_s=5)
        assert time.monotonic() - started < 2  # refused as soon as it beat, not after the stale time
        assert generation(tmp_path) == 1
    finally:
        stop(first)


@pytest.mark.slow
def test_a_late_beat_is_no_take_over_while_the_holder_still_runs_here(tmp_path):
    """A frozen holder (SIGSTOP, a stalled file system) on this host is alive however late its beat: refused after
    a look at its beat (not the stale time), naming its process, and its generation stays."""
    first = holder(tmp_path)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(UserError, match=f"in use by another run \\(pid {first.pid} on .*: its lease did not beat "
                                            f"in 5 s watched, but process {first.pid} runs on this host\\)"):
            take_lease(tmp_path, None, 0)
        assert time.monotonic() - started < LEASE_STALE_S and generation(tmp_path) == 1
    finally:
        os.kill(first.pid, signal.SIGCONT)
        stop(first)


@pytest.mark.parametrize("state", ["RUNNING", "COMPLETING"])
def test_a_late_beat_is_no_take_over_while_the_scheduler_lists_the_holders_job(tmp_path, state):
    """Job 41's beat is late (a node cut off from the file system, a slow metadata server), and Slurm runs it: the
    launcher's look and rank 0's wait both refuse, naming the job, however long the beat is late."""
    held = Lease.take(tmp_path, 0, "41", 0)
    with pytest.raises(UserError, match=f"job 41, restart 0, .*, but job 41 is {state}\\); wait for it to end or stop "
                                        r"it \(scancel 41\)"):
        take_lease(tmp_path, "42", 0, said(state), stale_s=0.5)
    with pytest.raises(UserError, match=f"job 41 is {state}"):
        check_free(tmp_path, None, 0, said(state), stale_s=0.5)
    assert generation(tmp_path) == held.generation


def test_a_frozen_holder_that_cannot_be_asked_after_is_taken_over_and_stops_without_writing_when_it_wakes(tmp_path,
                                                                                                            caplog):
    """A holder on another host without a job (a local run there) can be proven neither alive nor gone: its lease
    is taken over once it did not beat for the stale time, and the fence stops it when it wakes."""
    first = holder(tmp_path)
    os.kill(first.pid, signal.SIGSTOP)  # frozen for longer than the lease's stale time
    wait_until(lambda: psutil.Process(first.pid).status() == psutil.STATUS_STOPPED, 10, "the holder stopped",
               poll_s=0.01)  # a beat it was writing as the signal came is written before the one below
    beat = json.loads((tmp_path / "lease.json").read_text())
    beat = {**beat, "host": "another-host", "time": time.time() - 25}  # its beat names its host; 25 s silent
    (tmp_path / "lease.json").write_text(json.dumps(beat))
    try:
        with caplog.at_level(logging.WARNING):
            lease = take_lease(tmp_path, None, 0, stale_s=1)
        taken = time.time()
        assert lease.generation == 2
        took = [r.getMessage() for r in caplog.records if r.getMessage().startswith("took over")]
        assert len(took) == 1 and re.search(r"generation 1: its lease has not beaten since 2[5-9] s ago \(its "
                                            r"host's clock; none in 1 s watched\)$", took[0]), took
    finally:
        os.kill(first.pid, signal.SIGCONT)
    try:
        assert first.wait(timeout=10) == 1
    finally:
        lease.release()
    said = first.stderr.read()
    assert f"lost the run folder {tmp_path} to pid {os.getpid()} on " in said, said
    assert "(generation 2); this process stops without writing" in said and "Traceback" not in said
    writes = [float(t) for t in (tmp_path / "writes").read_text().split()]
    assert max(writes) < taken  # no fence check that began after the take-over let a write through
    assert read_beat(tmp_path).generation == 2  # its beat did not overwrite the new holder's


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    first = holder(tmp_path)
    stop(first)
    started = time.monotonic()
    lease = take_lease(tmp_path, None, 0, stale_s=30)
    assert lease.generation == 2 and time.monotonic() - started < 2
    lease.release()
    assert read_beat(tmp_path).ended and check_free(tmp_path, None, 0, stale_s=30)[1] == "it ended"


def test_an_unreadable_lease_fails_closed(tmp_path):
    (tmp_path / "lease.json").write_text('{"job_id": "7", "heartbeat": 5}')  # not a lease
    with pytest.raises(UserError, match=f"the run folder's lease {tmp_path / 'lease.json'} is not one"):
        take_lease(tmp_path, None, 0, stale_s=0.5)
    assert not (tmp_path / "lease").exists()


def test_a_folder_from_before_the_beat_was_named_lease_json_keeps_its_holder(tmp_path):
    """Earlier versions beat lock.json: its holder still refuses a second run, and the next taker beats lease.json
    alone (the old file goes, so it cannot speak for the folder again)."""
    Lease.take(tmp_path, 0, "41", 0)
    (tmp_path / "lease.json").rename(tmp_path / "lock.json")
    with pytest.raises(UserError, match="in use by another run .job 41, restart 0, .*job 41 is PENDING"):
        take_lease(tmp_path, "42", 0, said("PENDING"), stale_s=0.5)
    lease = take_lease(tmp_path, "42", 0, said("CANCELLED"), stale_s=30)
    assert lease.generation == 2 and not (tmp_path / "lock.json").exists()
    assert read_beat(tmp_path).job_id == "42"
    lease.release()


@pytest.mark.parametrize("state", ["PENDING", "SUSPENDED", "REQUEUED"])
def test_a_holder_whose_job_waits_or_is_suspended_keeps_the_folder(tmp_path, state):
    held = Lease.take(tmp_path, 0, "41", 0)  # beats no more: its job was suspended or sent back to the queue
    with pytest.raises(UserError, match=f"job 41, restart 0, .*: job 41 is {state}\\); wait for it to end or stop "
                                        r"it \(scancel 41\)"):
        take_lease(tmp_path, "42", 0, said(state), stale_s=0.5)
    assert generation(tmp_path) == held.generation


def test_an_ended_job_is_taken_over_at_once_and_an_earlier_attempt_yields_once_stale(tmp_path):
    Lease.take(tmp_path, 0, "41", 0)
    started = time.monotonic()
    second = take_lease(tmp_path, "42", 0, said("CANCELLED"), stale_s=30)
    assert second.generation == 2 and time.monotonic() - started < 1
    second.release()
    Lease.take(tmp_path, 2, "43", 0)  # restart 0 of job 43, stale; restart 1 of the same job takes over
    later = take_lease(tmp_path, "43", 1, said("RUNNING"), stale_s=0.5)
    assert later.generation == 4
    try:
        with pytest.raises(UserError, match="restart 1 of this job runs it; this is restart 0"):
            take_lease(tmp_path, "43", 0, said("RUNNING"), stale_s=0.5)  # an orphan of the earlier attempt
    finally:
        later.release()


def test_only_its_own_launchs_next_round_takes_over_at_once(tmp_path):
    """Round 0 of launch L1 inside job 7 (its holder: this live process) yields at once to L1's round 1, never to
    round 1 of another launch in the same allocation."""
    Lease.take(tmp_path, 0, "7", 0, 0, "L1")
    with pytest.raises(UserError, match=f"process {os.getpid()} runs on this host"):
        take_lease(tmp_path, "7", 0, said("RUNNING"), stale_s=0.5, round_=1, launch="L2")
    started = time.monotonic()
    lease = take_lease(tmp_path, "7", 0, said("RUNNING"), stale_s=30, round_=1, launch="L1")
    assert lease.generation == 2 and time.monotonic() - started < 1 and read_beat(tmp_path).launch == "L1"
    lease.release()


@pytest.mark.slow
def test_taking_the_folder_asks_slurm_once_about_another_job_and_never_about_its_own(tmp_path):
    """A requeued attempt finds its own job's beat: that job runs (it is this one). One question per other job:
    at a thousand nodes every attempt's start-up is an RPC the controller answers."""
    asked = []

    def state(job):
        asked.append(job)
        return JobStanding(job, JobState.ENDED, "CANCELLED")
    Lease.take(tmp_path, 0, "41", 0)
    take_lease(tmp_path, "42", 0, state, stale_s=30).release()
    assert asked == ["41"]
    Lease.take(tmp_path, 2, "43", 0)  # restart 0 of job 43, stale; restart 1 of the same job takes over
    take_lease(tmp_path, "43", 1, state, stale_s=0.5).release()
    assert asked == ["41"]


@pytest.mark.slow
def test_a_run_frozen_past_its_lease_keeps_its_folder_and_finishes_when_it_wakes(tmp_path, data_overrides):
    """A local run's rank 0 frozen by SIGSTOP for longer than the launcher's look at the lease is alive all the same:
    the same command is refused at once in one line naming its process, and rewrites nothing (the frozen run's
    config stays); woken by SIGCONT, the run finishes alone, one writer from start to end."""
    run = tmp_path / "run"
    args = ["model=tiny", "train.max_steps=30", "train.log_interval=1", "train.eval_interval=0",
            "checkpoint.interval_steps=5", *data_overrides, f"hydra.run.dir={run}", "train.progress=false"]
    first = subprocess.Popen([sys.executable, "-m", "launch", *args, "debug.delay_rank=0", "debug.delay_s=0.1"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (run / "checkpoints" / "step_00000010").exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.2)
        rank0 = json.loads((run / "environment" / "rank0.json").read_text())["pid"]
        os.kill(rank0, signal.SIGSTOP)
        time.sleep(3 * LEASE_BEAT_S)  # its beat is late
        config = (run / "config.yaml").read_bytes()
        second = subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"process {rank0} runs on this host" in second.stderr and "Traceback" not in second.stderr
        assert (run / "config.yaml").read_bytes() == config  # the first's debug.* stays
    finally:
        os.kill(rank0, signal.SIGCONT)
    assert first.wait(timeout=120) == 0, first.stderr.read()[-3000:]
    assert generation(run) == 1 and read_beat(run).ended
    ended = [json.loads(x)["ended"] for x in (run / "attempts.jsonl").read_text().splitlines()]
    assert ended == ["finished"], ended


def test_an_orphan_of_an_earlier_generation_is_no_peer(tmp_path, monkeypatch):
    """Both attempts' heartbeats carry the same attempt number when the old one wrote no line: the generation tells
    the new attempt's ranks from an orphan of the old one."""
    from gpt.resilience import lease
    from launch.recovery.heartbeat import read_heartbeats, write_heartbeat

    monkeypatch.setattr(lease, "_FENCE", None)
    lease.install_fence(tmp_path, 2)
    (tmp_path / "watchdog").mkdir()
    write_heartbeat(tmp_path, 0, {"attempt": 3, "time": time.time()})
    orphan = tmp_path / "watchdog" / "rank1.json"
    orphan.write_text(json.dumps({"attempt": 3, "time": time.time(), "generation": 1}))
    beats = read_heartbeats(tmp_path, 2, 3)
    assert beats[0]["generation"] == 2 and beats[1] is None


def test_a_rank_of_a_displaced_attempt_stops_at_its_next_heartbeat(tmp_path):
    """Any rank, not only the lease's holder: once a later generation is claimed, its next heartbeat is not written
    and the process exits with the line."""
    rank = ("import sys\nfrom pathlib import Path\nfrom gpt.resilience.lease import install_fence\n"
            "from launch.recovery.heartbeat import write_heartbeat\nrun = Path(sys.argv[1])\n"
            "install_fence(run, 1)\nwrite_heartbeat(run, 1, {'attempt': 1})\n"
            "(run / 'lease' / '2').write_text('{}')\nwrite_heartbeat(run, 1, {'attempt': 2})\n")
    (tmp_path / "watchdog").mkdir()
    Lease.take(tmp_path, 0, None, 0)
    proc = subprocess.run([sys.executable, "-c", rank, str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "(generation 2); this process stops without writing" in proc.stderr, proc.stderr
    assert json.loads((tmp_path / "watchdog" / "rank1.json").read_text())["attempt"] == 1


def test_run_json_is_written_under_a_name_no_other_host_uses(tmp_path, data_overrides):
    """Tasks on several hosts write run.json at once, and in pid-namespaced containers their pids collide: another
    host's temporary file with this process's pid is left alone."""
    from launch import launch_config
    from helpers import compose
    from launch.rank.job_env import JobEnvironment
    from gpt.data.inputs import corpus_of
    from launch.run.identity import check_run_folder

    run = launch_config.parse(compose("model=tiny", *data_overrides))
    other = tmp_path / f".run.json.{os.getpid()}"  # another host's task with the same pid, mid-write
    other.write_text("another host's")
    check_run_folder(run, corpus_of(run.data), tmp_path, JobEnvironment({})).record(tmp_path)
    assert other.read_text() == "another host's" and "identity" in json.loads((tmp_path / "run.json").read_text())


def test_a_name_an_nfs_client_still_caches_as_absent_is_found_in_its_folders_listing(tmp_path, monkeypatch):
    """NFS may answer a lookup of a name that was absent from its cache of that absence: the successor's claim and
    the holder's lease.json, looked up before they existed, then read as missing. A unit test can only check the
    path: each lookup that says 'absent' is checked against its folder's listing, which the server answers."""
    holder = Lease.take(tmp_path, 0, "7", 0)
    Lease.take(tmp_path, 1, "8", 0)  # the successor's claim, lease/2, and its beat
    hidden = {tmp_path / "lease" / "2", tmp_path / "lease.json"}  # cached as absent by this client
    real_read, real_exists = Path.read_text, Path.exists

    def read_text(path, *args, **kwargs):
        if path in hidden:
            hidden.discard(path)  # listing the folder dropped the cached absence
            raise FileNotFoundError(path)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(Path, "exists", lambda path: path not in hidden and real_exists(path))
    assert holder.successor().job_id == "8"
    assert read_beat(tmp_path).job_id == "8"
