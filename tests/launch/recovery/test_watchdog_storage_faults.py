"""A watchdog whose own report fails (the usual cause of a hang is a storage incident, which hits every rank alike)
still requeues first and ends its process within a bound: a real file system fault under a real watchdog thread,
in a process of its own (a directory where the report goes, a full tmpfs, a tmpfs remounted read-only)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpt.config.sections import WatchdogConfig
from gpt.errors import EXIT_HANG
from gpt.resilience.progress import Progress
from launch.recovery.hang import HangReport
from launch.recovery.watchdog import Watchdog
from helpers import launch, read_only, tmpfs
from test_watchdog import RUN

# A rank that hangs in start-up: its watchdog fires after startup_s (3 s: the test breaks the storage first, with
# mount calls that a loaded machine slows); on_hang records that it was asked to act
# (its report, or None) and says "requeued" when told to, then the process must exit with EXIT_HANG by itself.
RANK = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    from gpt.config.sections import WatchdogConfig
    from gpt.resilience import timing
    from launch.recovery import watchdog
    from gpt.resilience.progress import PROGRESS
    run_dir, asked = Path(sys.argv[1]), Path(sys.argv[2])
    watchdog.REQUEUE_WAIT_S = 1.0  # a requeued rank waits for Slurm's kill: no Slurm here
    def on_hang(report):
        asked.write_text(json.dumps({"report": report is not None, "at": time.time()}))
        return True
    dog = watchdog.Watchdog(WatchdogConfig(startup_s=3.0, interval_s=0.2), run_dir, 0, 1, "h", 1, on_hang).start()
    Path(sys.argv[3]).touch()  # started: the test breaks the storage now
    while True:
        PROGRESS.stop_if_halted()  # the main thread parks once the watchdog has halted it, as a stuck rank does
        time.sleep(0.1)
""")


def run_rank(tmp_path: Path, run_dir: Path, break_storage) -> tuple[subprocess.CompletedProcess, dict, float]:
    asked, started = tmp_path / "asked.json", tmp_path / "started"
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", RANK, str(run_dir), str(asked), str(started)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not started.exists() and proc.poll() is None:
        time.sleep(0.05)
    break_storage()
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the rank never exited: it parks\n{out[-3000:]}") from None
    took = time.monotonic() - start
    assert asked.exists(), f"on_hang (the requeue) was never called\n{out[-3000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out), json.loads(asked.read_text()), took


@pytest.fixture
def mount(tmp_path):
    with tmpfs(tmp_path / "mnt", 256 * 1024) as mounted:
        yield mounted


def fill(mount: Path) -> None:
    """Fill the file system to the last byte: every write after this fails with ENOSPC."""
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


@pytest.mark.parametrize("fault", ["report path is a directory", "disk full", "read-only"])
@pytest.mark.slow
def test_a_watchdog_whose_report_fails_still_requeues_and_exits(tmp_path, mount, fault):
    run_dir = mount / "run"
    if fault == "report path is a directory":
        (run_dir / "hang-1.txt").mkdir(parents=True)  # EISDIR at every write of the readable report
        breaks = lambda: None  # noqa: E731
    elif fault == "disk full":
        breaks = lambda: fill(mount)  # noqa: E731
    else:
        breaks = lambda: read_only(mount)  # noqa: E731
    proc, asked, took = run_rank(tmp_path, run_dir, breaks)
    print(f"{fault}: the rank asked to requeue and exited {took:.1f} s after it started (startup_s=3)")
    assert proc.returncode == EXIT_HANG, proc.stdout[-3000:]
    assert asked["report"], "the one rank of the job must act (requeue) even where it cannot claim the report"
    assert took < 3 + 30, took
    assert "watchdog: cannot write the hang report" in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]


class BrokenPath(type(Path())):
    """A report path whose every look-up fails as on a lost NFS server (ESTALE): a stand-in, since a stale handle
    cannot be made on demand here."""

    def exists(self, *args, **kwargs):
        raise OSError(errno.ESTALE, "Stale file handle")

    is_file = exists


def test_the_watchdog_thread_survives_a_stale_file_handle(tmp_path, monkeypatch):
    progress = Progress()
    dog = Watchdog(WatchdogConfig(startup_s=3600, interval_s=0.05), tmp_path, 0, 1, "h", 1, lambda r: False,
                   progress)
    broken = BrokenPath(dog.report.json_path)
    monkeypatch.setattr(HangReport, "json_path", property(lambda self: broken))
    dog.start()
    time.sleep(0.5)
    assert dog.thread.is_alive(), "the watchdog thread died: a hang after this would park the rank for ever"
    dog.cfg = WatchdogConfig(startup_s=3600, interval_s=3600)  # the daemon thread sleeps out the test session


def test_the_save_budget_follows_the_measured_saves(tmp_path):
    progress = Progress()
    cfg = WatchdogConfig(step_floor_s=5, step_factor=10, save_floor_s=20, save_first_s=600)
    dog = Watchdog(cfg, tmp_path, 0, 1, "h", 1, lambda r: False, progress)
    progress.phase("step", "step 0", 0)
    progress.phase("step", "step 1", 1)
    progress.phase("save", "checkpoint save at step 1", 1)
    assert dog.budget()[:2] == ("watchdog.save_first_s", 600)  # no save measured yet
    time.sleep(0.3)
    progress.phase("step", "step 2", 2)
    assert 0.3 <= progress.longest_save_s() < 1.0
    progress.phase("save", "checkpoint save at step 2", 2)
    assert dog.budget()[:2] == ("watchdog.save_s (auto)", 20)  # 10 x 0.3 s is under the floor
    progress.save_times.append(4.0)
    assert dog.budget()[:2] == ("watchdog.save_s (auto)", 40.0)  # 10 x the longest save
    progress.phase("finish", "the final save", 3)
    assert dog.budget()[:2] == ("watchdog.save_first_s", 600)  # synchronous even where the others are not
    fixed = Watchdog(WatchdogConfig(save_s=90), tmp_path, 0, 1, "h", 1, lambda r: False, progress)
    assert fixed.budget()[:2] == ("watchdog.save_s", 90)


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_a_run_whose_hang_report_cannot_be_written_still_ends_within_its_budget(tmp_path, data_overrides):
    """Two real ranks, rank 1 hangs; the readable report's path is a directory (EISDIR at every write of it)."""
    step_s = 8
    (tmp_path / "hang-generation1.txt").mkdir()  # the report of the attempt that holds the lease's generation 1
    start = time.monotonic()
    proc = launch(*RUN, *data_overrides, "debug.hang_rank=1", "debug.hang_step=12", f"watchdog.step_s={step_s}",
                  run_dir=tmp_path, check=False)
    took = time.monotonic() - start
    print(f"a hang whose report cannot be written ended the run in {took:.1f} s (watchdog.step_s={step_s})")
    assert proc.returncode == 1, proc.stderr
    (ended,) = [json.loads(x) for x in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert (ended["ended"], ended["last_step"]) == ("hang", 12)
    assert f"error: {ended['hang']}" in proc.stderr  # the one line, though its report could not be written
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("rank*.log"))
    assert "watchdog: cannot write the hang report" in logs and "Traceback" not in logs
