"""A disk that fills up during a save, for real: a 2-rank local run whose run folder is a small tmpfs (root mounts
it; CI runs as root for its Slurm cluster). The previous checkpoint stays whole, the partial save is removed, every
rank says the same one line (the folder, the space a checkpoint needs), and the run stops with exit code 2, or with
checkpoint.on_save_error=continue trains on and saves once there is room again, bitwise as if nothing happened."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import REPO, launch, losses, tmpfs, wait_until
from gpt.checkpoint.store import list_checkpoints, verify
from gpt.run_folder import RunFolder

RUN = ["model=tiny", "strategy=ddp", "cluster.tasks_per_node=2", "train.warmup_steps=2", "train.eval_interval=0",
       "train.log_interval=1", "checkpoint.interval_steps=4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_overrides) -> tuple[Path, int]:
    """An uninterrupted run of 12 steps, and the size of one of its checkpoints."""
    run_dir = tmp_path_factory.mktemp("storage") / "reference"
    launch(*RUN, *data_overrides, "train.max_steps=12", run_dir=run_dir)
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    return run_dir, sum(json.loads((newest / "meta.json").read_text())["files"].values())


@pytest.mark.slow
def test_disk_full_at_a_save_keeps_the_previous_checkpoint_and_stops_with_one_line(reference, data_overrides,
                                                                                  tmp_path):
    _, size = reference
    with tmpfs(tmp_path / "small", int(1.6 * size) + 512 * 1024) as small:  # room for one checkpoint, not two
        run_dir = small / "run"
        start = time.monotonic()
        proc = launch(*RUN, *data_overrides, "train.max_steps=12", run_dir=run_dir, check=False, timeout=120)
        took = time.monotonic() - start
        out = proc.stdout + proc.stderr
        ckpts = run_dir / "checkpoints"
        assert proc.returncode == 2, out[-3000:]
        lines = [x for x in out.splitlines() if "cannot write checkpoint" in x]
        assert len(lines) == 2 and all(x.endswith(lines[0].split("ERROR] ", 1)[1]) for x in lines), out[-3000:]
        assert f"cannot write checkpoint {ckpts}/.tmp-step_00000008: the disk is full" in lines[0]
        assert f"a checkpoint needs about {size / 2**20:.1f} MiB and " in lines[0]
        assert "step_00000004 is kept" in lines[0] and "checkpoint.keep" in lines[0]
        assert "Traceback" not in out, out[-3000:]
        assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000004"]
        assert verify(ckpts / "step_00000004") is None and not list(ckpts.glob(".tmp-*"))
        assert took < 60


@pytest.mark.slow
def test_disk_full_with_on_save_error_continue_trains_on_and_saves_once_there_is_room(reference, data_overrides,
                                                                                     tmp_path):
    full, size = reference
    with tmpfs(tmp_path / "small", int(2.5 * size) + 512 * 1024) as small:
        ballast = small / "ballast"
        ballast.write_bytes(b"\0" * (2 * size))  # the first save (step 4) finds no room
        run_dir = small / "run"
        cmd = [sys.executable, "-m", "launch", f"hydra.run.dir={run_dir}", "train.progress=false", *RUN,
               *data_overrides, "train.max_steps=12", "checkpoint.keep=1", "checkpoint.on_save_error=continue",
               "debug.delay_rank=0", "debug.delay_s=0.3"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ})
        log = run_dir / "logs" / "rank0.log"
        deadline = time.monotonic() + 90
        while "on_save_error=continue" not in (log.read_text() if log.is_file() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        ballast.unlink()  # room again: the next interval's save goes in
        out = proc.communicate(timeout=90)[0]
        assert proc.returncode == 0, out[-3000:]
        warned = [x for x in log.read_text().splitlines() if "on_save_error=continue" in x]
        # step 4's save failed; a busy machine may see step 8's fail too before the ballast is gone
        assert 1 <= len(warned) <= 2 and all("cannot write checkpoint" in x for x in warned), warned
        assert ".tmp-step_00000004" in warned[0]
        # rank 0 recorded each refused save as it happened, for the login node's waiter (launch.backends.slurm.wait)
        records = RunFolder(run_dir).read_save_failures()
        assert [r["step"] for r in records] == [int(re.search(r"\.tmp-step_(\d+)", x)[1]) for x in warned]
        assert all("cannot write checkpoint" in r["error"] for r in records), records
        assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000012"]
        assert losses(run_dir) == losses(full)
        # the launcher's console and launch.status say so too, not a plain "done"
        failed = [int(re.search(r"\.tmp-step_(\d+)", x)[1]) for x in warned]
        said = f"checkpoint saves failed at step(s) {', '.join(map(str, failed))} (checkpoint.on_save_error=continue"
        lines = out.splitlines()
        done = next(i for i, x in enumerate(lines) if "done. Run folder" in x)
        assert said in lines[done - 1] and "WARNING" in lines[done - 1], out[-3000:]
        status = subprocess.run([sys.executable, "-m", "launch.status", str(run_dir)], cwd=REPO, capture_output=True,
                                text=True)
        assert status.returncode == 0 and "finished; " + said in status.stdout, status.stdout + status.stderr


@pytest.mark.slow
def test_a_truncated_shard_in_the_newest_checkpoint_falls_back_and_finishes_bitwise(reference, data_overrides,
                                                                                      tmp_path):
    """The run had finished at step 12, but a shard of step 12 lost its tail: the same command does not say
    "finished; nothing to do", it continues from step 8 with a warning naming the file, and ends as the
    uninterrupted run did."""
    full, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(full, run_dir)
    shard = max((run_dir / "checkpoints" / "step_00000012").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    proc = launch(*RUN, *data_overrides, "train.max_steps=12", run_dir=run_dir)
    out = proc.stdout + proc.stderr
    assert "finished at step" not in out and "from step 8" in out, out[-3000:]
    warning = [x for x in (run_dir / "logs" / "rank0.log").read_text().splitlines() if "falling back" in x]
    assert len(warning) == 1 and f"shard {shard} has" in warning[0], warning
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    assert newest.name == "step_00000012" and verify(newest) is None
    assert losses(run_dir) == losses(full)


@pytest.mark.slow
def test_listing_checkpoints_while_another_process_prunes_them(tmp_path):
    """Folders vanish between the listing's glob and its reading of their meta.json (a prune elsewhere): they are
    left out, never an error."""
    root = tmp_path / "checkpoints"
    for step in range(1, 9):
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"step": step, "save_index": step}))
        (folder / ".metadata").write_text("")
    stop = threading.Event()

    def prune_and_restore() -> None:
        while not stop.is_set():
            for step in range(1, 9):
                folder, away = root / f"step_{step:08d}", tmp_path / f"away_{step}"
                os.rename(folder, away)
                os.rename(away, folder)

    churn = threading.Thread(target=prune_and_restore)
    churn.start()
    try:
        listed = [list_checkpoints(root) for _ in range(2000)]
    finally:
        stop.set()
        churn.join()
    assert all([int(p.name[5:]) for p in found] == sorted(int(p.name[5:]) for p in found) for found in listed)


def test_on_save_error_takes_stop_or_continue():
    from gpt.config.sections import CheckpointConfig
    from gpt.errors import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint.on_save_error='retry' is not valid: stop or continue"):
        CheckpointConfig(on_save_error="retry").validate()


def _snapshot(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_size for p in run_dir.rglob("*") if p.is_file()}


def _fill_disk_run(reference, data_overrides, tmp_path, *overrides: str) -> tuple[Path, str, int, float]:
    """A 12-step run in a tmpfs with room for two checkpoints that rank 0 fills up at a chosen step."""
    _, size = reference
    with tmpfs(tmp_path / "small", int(2.5 * size) + 2 * 2**20) as small:
        run_dir = small / "run"
        start = time.monotonic()
        proc = launch(*RUN, *data_overrides, "train.max_steps=12", *overrides, run_dir=run_dir, check=False,
                      timeout=120)
        took = time.monotonic() - start
        (small / ".debug-fill-disk").unlink()
        copy = tmp_path / "run"
        shutil.copytree(run_dir, copy)
    return copy, proc.stdout + proc.stderr, proc.returncode, took



def _one_line_each(out: str, ranks: int, *causes: str) -> None:
    """Every rank says each cause exactly once, and nothing prints a traceback."""
    assert "Traceback" not in out and "Logging error" not in out, out[-4000:]
    for cause in causes:
        for rank in range(ranks):
            said = [x for x in out.splitlines() if x.startswith(f"[rank{rank} ") and cause in x]
            assert len(said) == 1, (rank, cause, out[-4000:])


@pytest.mark.slow
def test_disk_full_between_saves_stops_at_the_next_save_and_the_same_command_continues(reference, data_overrides,
                                                                                        tmp_path):
    """Filled at step 6: the metrics, TensorBoard and heartbeat writers each say one line and training goes on
    (only a checkpoint holds the run's state); step 8's save meets the full disk and stops the run as a full disk
    at a save does. Once there is room, the same command resumes from step 4 and ends as the uninterrupted run."""
    full, size = reference
    with tmpfs(tmp_path / "small", int(2.5 * size) + 2 * 2**20) as small:
        run_dir = small / "run"
        proc = launch(*RUN, *data_overrides, "train.max_steps=12", "debug.fill_disk_step=6", "train.log_interval=1",
                      run_dir=run_dir, check=False, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out[-4000:]
        _one_line_each(out, 2, "cannot write checkpoint")
        _one_line_each(out, 1, "cannot write this attempt's line")
        assert "step_00000004 is kept" in out
        assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000004"]
        assert not list((run_dir / "checkpoints").glob(".tmp-*")) and not list(run_dir.glob(".lease.json.*"))
        assert all(json.loads(x) for x in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines())
        (small / ".debug-fill-disk").unlink()
        launch(*RUN, *data_overrides, "train.max_steps=12", run_dir=run_dir, timeout=120)
        assert losses(run_dir) == losses(full)
        attempts = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
        assert len(attempts) == 2 and attempts[0]["recorded_by"] == "the next attempt", attempts
        assert (attempts[0]["first_step"], attempts[0]["last_step"], attempts[1]["first_step"]) == (0, 4, 4)


@pytest.mark.slow
def test_disk_full_during_an_async_save_keeps_the_previous_checkpoint_and_stops_with_one_line(
        reference, data_overrides, tmp_path):
    """Step 8's save is written in the background when the disk fills: its commit fails, every rank says one line,
    the partial save goes, and step 4 stays loadable."""
    from gpt.checkpoint.writer import load_model

    _, size = reference
    with tmpfs(tmp_path / "small", int(2.5 * size) + 2 * 2**20) as small:
        run_dir = small / "run"
        proc = launch(*RUN, *data_overrides, "train.max_steps=12", "debug.fill_disk_step=8",
                      "checkpoint.async=true", run_dir=run_dir, check=False, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out[-4000:]
        _one_line_each(out, 2, "cannot write checkpoint")
        assert "step_00000004 is kept" in out
        ckpts = run_dir / "checkpoints"
        assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000004"] and not list(ckpts.glob(".tmp-*"))
        model, meta, _ = load_model(ckpts / "step_00000004")
        assert meta["step"] == 4 and model is not None


def said_once(caplog, start: str) -> None:
    """Waits until a line starting with `start` is logged (a beat thread's line: when it comes is its scheduling)."""
    wait_until(lambda: any(r.getMessage().startswith(start) for r in caplog.records), 20, start, poll_s=0.01)


def test_metrics_tensorboard_and_lease_writers_on_a_full_disk_say_one_line_each_and_go_on(tmp_path, caplog,
                                                                                           capfd):
    """Each writer beside the checkpoint, on a disk that fills and then has room again: one line when it first
    fails (the folder, the cause), whole records only, no thread's traceback, and it writes again once it can."""
    from gpt.resilience.disk_faults import LogFile
    from gpt.resilience.faults import fill_disk
    from gpt.resilience.lease import Lease, read_beat
    from gpt.train.metrics import MetricsWriter
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    caplog.set_level(logging.INFO)
    with tmpfs(tmp_path / "small", 4 * 2**20) as small:
        run_dir = small / "run"
        metrics = MetricsWriter(run_dir, 0, "host")
        lease = Lease.take(run_dir, 0, None, 0)
        lease.start(beat_s=0.02)
        rank_log = logging.getLogger("test.rank_log")
        rank_log.addHandler(LogFile(run_dir / "rank0.log"))
        metrics.write(0, {"loss": 1.0})
        fill_disk(small / ".debug-fill-disk")
        for step in range(1, 200):
            metrics.write(step, {"loss": 1.0, "note": "x" * 200})
            rank_log.warning("step %d %s", step, "x" * 200)
        said_once(caplog, "cannot write the lease's beat")  # the beat thread met the full disk too
        beat = read_beat(run_dir)
        (small / ".debug-fill-disk").unlink()
        metrics.write(200, {"loss": 2.0})
        said_once(caplog, "the lease's beat in")  # ... is written again: a beat of the thread after the room came back
        lease.release()
        metrics.close()
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        for what, folder in [("metrics file rank0.jsonl", run_dir / "metrics"),
                             ("TensorBoard events", run_dir / "tensorboard" / "rank0"), ("the lease's beat", run_dir),
                             ("the log file", run_dir)]:
            lines = [x for x in said if x.startswith(f"cannot write {what} in {folder}: the disk is full; ")]
            assert len(lines) == 1, said
        again = [r.getMessage() for r in caplog.records if r.getMessage().endswith("is written again")]
        assert len(again) == 3, again
        err = capfd.readouterr().err
        assert "Traceback" not in err and "Logging error" not in err, err[-3000:]
        steps = [json.loads(x)["step"] for x in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()]
        assert steps[0] == 0 and steps[-1] == 200 and len(steps) < 200
        assert beat is not None and read_beat(run_dir).seq > beat.seq and read_beat(run_dir).ended
        assert not list(run_dir.glob(".lease.json.*"))
        files = list((run_dir / "tensorboard" / "rank0").glob("events.*"))
        events = [e for f in files for e in EventFileLoader(str(f)).Load() if e.HasField("summary")]  # whole only
        assert len(files) == 1 and events[0].step == 0 and events[-1].step == 200 and len(events) < 200, files


@pytest.mark.slow
def test_an_mlflow_file_store_on_a_full_disk_says_one_line_naming_its_folder(tmp_path, caplog):
    from gpt.config.tracking import TrackingConfig
    from gpt.resilience.faults import fill_disk
    from gpt.train.tracker import open_tracker

    with tmpfs(tmp_path / "small", 4 * 2**20) as small:
        run_dir = small / "run"
        run_dir.mkdir()
        tracker = open_tracker(TrackingConfig(kind="mlflow"), run_dir, "run", None)
        tracker.log(0, {"train/loss": 1.0})
        fill_disk(small / ".debug-fill-disk")
        for step in range(1, 300):  # a metric's file fills its last page before the disk refuses it
            tracker.log(step, {"train/loss": 1.0})
        tracker.close()
        said = [r.getMessage() for r in caplog.records if r.name == "gpt.train.tracker"]
        assert len(said) == 1 and f"cannot write its files in {small / 'mlruns'}: the disk is full" in said[0], said
