"""A run is one folder: the same command continues it, and anything that would mix two runs in one folder is
refused before a rank starts."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO, launch, losses

RUN = ["model=tiny", "train.max_steps=20", "train.log_interval=1", "train.eval_interval=0", "checkpoint.interval_steps=5"]


def attempts(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_finished_run_says_so_and_a_changed_one_is_refused(tmp_path, data_overrides):
    run = tmp_path / "run"
    launch(*RUN, *data_overrides, run_dir=run)
    records = {name: (run / name).read_bytes() for name in ("config.yaml", "run.json")}
    again = launch(*RUN, *data_overrides, run_dir=run)
    assert "finished at step 20; nothing to do" in again.stdout and len(attempts(run)) == 1
    # nothing to do with fewer steps, another layout or micro-batch: the run keeps the records of what it ran
    fewer = launch(*RUN, "train.max_steps=10", "train.decay_steps=20", "train.micro_batch_size=3", *data_overrides,
                   run_dir=run)
    assert "finished at step 20; nothing to do" in fewer.stdout
    assert {name: (run / name).read_bytes() for name in records} == records

    changed = launch(*RUN, "train.lr=0.01", *data_overrides, run_dir=run, check=False)
    assert changed.returncode == 2 and "train.lr: the run has 0.001, this command 0.01" in changed.stderr
    assert "run=NAME" in changed.stderr and "Traceback" not in changed.stderr

    text = tmp_path / "other.txt"  # the same vocabulary, other text
    text.write_text(open(data_overrides[0].split("=", 1)[1]).read()[::-1])
    other = launch(*RUN, f"data.text_path={text}", f"data.dir={tmp_path / 'other'}", run_dir=run, check=False)
    corpus = Path(data_overrides[0].split("=", 1)[1]).resolve()
    assert other.returncode == 2 and f"data.text_md5: {text.resolve()} (before: {corpus}) " \
        "changed (the same size (1,115,394 bytes), modified " in other.stderr

    fresh = launch(*RUN, "resume=none", *data_overrides, run_dir=run, check=False)
    assert fresh.returncode == 2 and "resume=none would start over on top of it" in fresh.stderr
    longer = launch(*[o for o in RUN if "max_steps" not in o], "train.max_steps=30", *data_overrides, run_dir=run,
                    check=False)  # the derived decay_steps changed: the hint names the value that continues it
    assert longer.returncode == 2 and ("train.decay_steps (or max_steps): the run has 20, this command 30: add "
                                       "train.decay_steps=20 to this command") in longer.stderr
    assert len(attempts(run)) == 1  # nothing ran


@pytest.mark.slow
def test_raising_max_steps_with_a_fixed_schedule_trains_on(tmp_path, data_overrides):
    run = tmp_path / "run"
    launch(*RUN, "train.decay_steps=40", *data_overrides, run_dir=run)
    launch(*[o for o in RUN if "max_steps" not in o], "train.max_steps=30", "train.decay_steps=40", *data_overrides,
           run_dir=run)
    assert [a["first_step"] for a in attempts(run)] == [0, 20] and len(losses(run)) == 30


@pytest.mark.slow
def test_a_second_launch_is_refused_and_a_killed_holder_is_taken_over(tmp_path, data_overrides):
    run = tmp_path / "run"
    slow = [o for o in RUN if "max_steps" not in o] + ["train.max_steps=400", "debug.delay_rank=0", "debug.delay_s=0.05"]
    first = subprocess.Popen([sys.executable, "-m", "launch", *slow, *data_overrides, f"hydra.run.dir={run}",
                              "train.progress=false"], cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "checkpoints" / "step_00000010").exists() or time.monotonic() > deadline):
            time.sleep(0.2)
        holder = json.loads((run / "lease.json").read_text())
        second = launch(*slow, *data_overrides, run_dir=run, check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another run (pid {holder['pid']} on {holder['host']}" in second.stderr
    finally:  # kill -9 of every process of the run: no save, no goodbye, the lease left behind
        tree = [first.pid, *(c.pid for c in psutil.Process(first.pid).children(recursive=True))]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        first.wait()
    assert (run / "lease.json").exists()
    relaunch = launch(*[o for o in slow if not o.startswith("debug.")], *data_overrides, run_dir=run)
    said = relaunch.stdout + relaunch.stderr
    assert "took over the run folder from pid" in said and "is gone" in said, said[-3000:]
    killed, finished = attempts(run)
    assert killed["ended"].startswith("killed outright") and killed["recorded_by"] == "the next attempt"
    assert killed["last_step"] == finished["first_step"] >= 10 and finished["ended"] == "finished"
    # the steps it kept (up to the checkpoint the next attempt resumed from) count as training
    kept = killed["goodput"]
    assert kept["steps"] == killed["last_step"] and 0 < kept["train_s"] < kept["allocated_s"], killed
    assert not (run / "attempt.json").exists()
    assert json.loads((run / "lease.json").read_text())["ended"]  # released at the end: the next run takes it at once


@pytest.mark.slow
def test_resume_path_initialises_and_the_runs_own_checkpoints_win_afterwards(tmp_path, data_overrides):
    source, run = tmp_path / "source", tmp_path / "run"
    launch(*RUN, *data_overrides, run_dir=source)
    init = f"resume={source / 'checkpoints' / 'step_00000010'}"
    more = [o for o in RUN if "max_steps" not in o] + ["train.max_steps=30", "train.decay_steps=40"]
    stopped = launch(*more, init, "debug.signal_at_step=20", "debug.signal_name=SIGTERM", *data_overrides,
                     run_dir=run, check=False)
    assert stopped.returncode == 2, stopped.stderr[-2000:]  # saved at step 20 and stopped: no scheduler here
    launch(*more, init, *data_overrides, run_dir=run)  # the same command: its own step 20, not step 10 again
    assert [(a["first_step"], a["last_step"]) for a in attempts(run)] == [(10, 20), (20, 30)]
    assert "this run continues from its own checkpoints" in (run / "logs" / "rank0.log").read_text()


@pytest.mark.slow
def test_every_rank_resumes_from_the_same_step(tmp_path, data_overrides):
    """Rank 1 cannot read the newest checkpoint: every rank falls back to the one before, together."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    two = [o for o in RUN if "max_steps" not in o] + ["train.max_steps=20", "strategy=ddp", "nodes=2"]
    launch(*two, *data_overrides, run_dir=reference)
    launch(*two, "debug.signal_at_step=12", *data_overrides, run_dir=run, check=False)
    launch(*two, "debug.unreadable_rank=1", *data_overrides, run_dir=run)
    assert [a["first_step"] for a in attempts(run)] == [0, 10]  # not 12 on rank 0 and 10 on rank 1
    assert "rank 1 on" in (run / "logs" / "rank0.log").read_text()
    assert losses(run) == losses(reference) and losses(run, rank=1) == losses(reference, rank=1)


def test_a_zombie_holds_no_lock():
    """A rank killed after its launcher died lingers as a zombie until pid 1 reaps it: it is gone, not a holder."""
    from launch.run.take_lease import _alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # exited, not reaped
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not _alive(child.pid)
    child.wait()
    assert _alive(os.getpid())


@pytest.mark.slow
def test_the_same_command_continues_on_a_corpus_touched_or_copied_without_p(tmp_path, data_overrides):
    """The corpus's identity is its content: touched, or replaced by a copy of itself made without -p, the same
    command is not refused (by its prepared folder nor by its run folder) and trains on."""
    run, text = tmp_path / "run", tmp_path / "input.txt"
    shutil.copyfile(data_overrides[0].split("=", 1)[1], text)
    data = [f"data.text_path={text}", f"data.dir={tmp_path / 'data'}"]
    first = [o for o in RUN if "max_steps" not in o] + ["train.max_steps=10", "train.decay_steps=20"]
    launch(*first, *data, run_dir=run)
    os.utime(text, (time.time() + 60, time.time() + 60))
    again = launch(*first, *data, run_dir=run, check=False)
    assert again.returncode == 0 and "finished at step 10; nothing to do" in again.stdout, again.stderr[-2000:]
    shutil.copyfile(text, tmp_path / "copy.txt")  # a copy without -p: a new file, a new modification time
    os.replace(tmp_path / "copy.txt", text)
    launch(*[o for o in first if "max_steps" not in o], "train.max_steps=20", *data, run_dir=run)
    assert [a["first_step"] for a in attempts(run)] == [0, 10]
