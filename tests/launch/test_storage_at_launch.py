"""A run folder on a file system that went read-only (a storage fault remounts it `ro`) or filled: the launch is one
line that says so and what to do, exit code 2, nothing started, not Hydra's traceback about its log file; and the
launcher's log file on a full disk says one line, not a traceback a line. Made for real: a tmpfs, and a read-only
bind mount over it."""
from __future__ import annotations

import logging.config

import pytest

from helpers import REPO, launch, read_only, tmpfs

TINY = ["model=tiny", "train.max_steps=2", "train.eval_interval=0", "checkpoint.interval_steps=0"]
READ_ONLY = ("the file system is read-only; nothing started: remount it read-write (or ask your site why it went "
             "read-only) and run the same command again, or give the run another folder (hydra.run.dir=DIR; a "
             "sweep: hydra.sweep.dir=DIR)")


@pytest.fixture
def mount(tmp_path):
    with tmpfs(tmp_path / "mnt", 64 * 2**20) as mounted:
        yield mounted


@pytest.mark.slow
def test_a_run_whose_folder_went_read_only_says_so_in_one_line(mount, data_overrides):
    launch(*TINY, *data_overrides, run_dir=mount / "run")  # a run that trained there
    read_only(mount)
    again = launch(*TINY, *data_overrides, run_dir=mount / "run", check=False)
    assert again.returncode == 2, again.stderr[-3000:]
    assert again.stderr.strip().splitlines() == [f"error: cannot write {mount}/run/app.log: {READ_ONLY}"]
    sweep = launch(*TINY, *data_overrides, "nodes=1,2", run_dir=mount / "sweep", check=False, multirun=True)
    assert sweep.returncode == 2
    assert sweep.stderr.strip().splitlines() == [f"error: cannot write {mount}/sweep: {READ_ONLY}"]


def test_the_launchers_log_file_on_a_full_disk_says_one_line_not_a_traceback_a_line(tmp_path, capfd):
    """Hydra's job logging writes the launcher's log file (app.log; a Slurm job's too) through LogFile."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gpt.resilience.faults import fill_disk

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        settings = OmegaConf.to_container(compose("config", return_hydra_config=True).hydra.job_logging)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with tmpfs(tmp_path / "small", 2**20) as small:
        settings["handlers"]["file"]["filename"] = str(small / "app.log")
        try:
            logging.config.dictConfig(settings)
            fill_disk(small / ".debug-fill-disk")
            for n in range(200):
                logging.getLogger("launch").info("line %d %s", n, "x" * 400)
        finally:
            for handler in root.handlers:
                handler.close()
            root.handlers[:], _ = saved
            root.setLevel(saved[1])
    said = "".join(capfd.readouterr())  # the console handler's lines, and what logging itself would print
    assert "Logging error" not in said and "Traceback" not in said, said[-2000:]
    assert said.count(f"cannot write the log file in {small}: the disk is full") == 1, said[-2000:]
    assert said.count("line 199 ") == 1  # the console has every line
