"""A run folder is its user's alone whatever the site's umask (002 let the group write what a run created): the
folder is 0700, and nothing in it is writable by anyone else; share_with_group=true opens it to the group for reading
(0750, every file group-readable), and to nobody else."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from helpers import launch

RUN = ["model=tiny", "train.max_steps=2", "train.warmup_steps=1", "train.eval_interval=0",
       "checkpoint.interval_steps=2", "cluster.tasks_per_node=2", "strategy=ddp"]


def modes(run_dir: Path) -> dict[str, int]:
    """Every entry of the folder (itself as '.'), by its path, to its permission bits."""
    out = {".": stat.S_IMODE(os.lstat(run_dir).st_mode)}
    for path in run_dir.rglob("*"):
        out[str(path.relative_to(run_dir))] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


@pytest.fixture
def site_umask():
    old = os.umask(0o002)
    yield
    os.umask(old)


@pytest.mark.slow
@pytest.mark.parametrize("share, folder", [(False, 0o700), (True, 0o750)])
def test_a_run_folder_is_its_users_alone_unless_shared_with_the_group(share, folder, tmp_path, site_umask,
                                                                       data_overrides):
    run_dir = tmp_path / "run"
    launch(*RUN, *data_overrides, f"share_with_group={str(share).lower()}", run_dir=run_dir)
    found = modes(run_dir)
    assert found.pop(".") == folder
    assert any(p.startswith("checkpoints/") for p in found) and "config.yaml" in found
    writable = {p: oct(m) for p, m in found.items() if m & 0o022}
    assert not writable, f"writable by the group or others: {writable}"
    if share:
        unreadable = {p: oct(m) for p, m in found.items() if not m & 0o040}
        assert unreadable == {"watchdog/node-secret": "0o600"}, unreadable  # the run's secret stays its user's
