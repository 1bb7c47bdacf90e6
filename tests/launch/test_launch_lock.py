"""Two launches of one run folder at once (launch.run.launch_lock): the second waits for the first's planning and then
sees its records, instead of writing its own config over them (the first's ranks trained with the second command's
settings); a launch that keeps the folder longer than the wait is named in one line."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from gpt.errors import UserError
from helpers import REPO, launch, losses
from launch.run import launch_lock

HOLD = """import sys, time
from pathlib import Path
from launch.run import launch_lock
launch_lock.hold(Path(sys.argv[1]))
print("held", flush=True)
if len(sys.argv) > 2:  # then launch with the lock held, as a launch does from its first look at the folder
    import runpy
    time.sleep(1.0)  # the other launch is waiting by now
    sys.argv = ["launch", *sys.argv[2:]]
    runpy.run_module("launch", run_name="__main__")
else:
    time.sleep(60)
"""


def holder(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def test_a_launch_waits_for_the_one_that_holds_the_folder_and_names_it_after_its_wait(tmp_path, capsys):
    proc = holder(str(tmp_path))
    try:
        with pytest.raises(UserError, match=rf"^{tmp_path} is being launched by the launch of pid {proc.pid} on "):
            launch_lock.hold(tmp_path, wait_s=0.6)
        assert f"waiting for the launch of pid {proc.pid}" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()
    launch_lock.hold(tmp_path, wait_s=5)  # its end let the lock go
    launch_lock.release(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_second_launch_is_refused_once_the_first_runs_and_the_first_trains_with_its_own_settings(tmp_path,
                                                                                                   data_overrides):
    """The second launch waits while the first plans; once the first's rank 0 holds the folder it is refused in one
    line, nothing of it written, and the first trains to its own end with its own config."""
    run = ["model=tiny", "train.eval_interval=0", "train.log_interval=1", "train.progress=false", "debug.delay_rank=0",
           *data_overrides]
    first = holder(str(tmp_path), *run, "train.max_steps=150", "debug.delay_s=0.05", "train.lr=1e-3",
                   f"hydra.run.dir={tmp_path}")
    second = launch(*run, "train.max_steps=8", "debug.delay_s=0", "train.lr=3e-4", run_dir=tmp_path, check=False)
    assert first.poll() is None, "the second launch waited for the whole first run"
    out, err = first.communicate(timeout=150)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"waiting for the launch of pid {first.pid}" in second.stderr
    (refusal,) = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert "is in use by another run" in refusal, second.stderr[-3000:]
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (config["train"]["lr"], config["train"]["max_steps"]) == (1e-3, 150)
    assert len(losses(tmp_path)) == 150
