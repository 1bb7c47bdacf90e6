"""`python -m launch.memory_snapshot RUN`, as a user runs it: refused in one line where no rank keeps an allocator
history, and says so where no rank answers in time (the ranks' side, through the CUDA stand-in: test_cuda_contract)."""
from __future__ import annotations

import subprocess
import sys

from helpers import REPO, plan


def snapshot_command(run_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.memory_snapshot", str(run_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_a_run_without_the_allocator_history_or_a_folder_that_is_no_run_is_refused_in_one_line(tmp_path):
    plain = snapshot_command(plan(tmp_path / "plain", "model=tiny"))
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1, plain.stderr
    assert "runs without profile.memory_snapshot=true" in plain.stderr
    assert not (tmp_path / "plain" / "profiles").exists()  # nothing asked
    nothing = snapshot_command(tmp_path / "nothing")
    assert nothing.returncode == 2 and "is not a run folder" in nothing.stderr


def test_a_request_no_rank_answers_says_so_after_its_wait(tmp_path):
    run = plan(tmp_path / "run", "model=tiny", "profile.memory_snapshot=true")
    proc = snapshot_command(run, "--wait-s", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no rank wrote a snapshot in 1 s" in proc.stdout and (run / "profiles" / "snapshot-request").is_file()
