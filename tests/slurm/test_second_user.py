"""Two Unix users of one cluster, as at a site: root and the local cluster's second user (gl-other, made by
slurm/local_cluster.sh) each launch a run of the same name from the same checkout at once, the second reading the
data the first prepared. Neither's jobs are taken for the other's (the launcher's waiting, `launch.list`,
`launch.cancel`), nothing in either run folder is writable by others and the run's secret is its owner's alone, and
the second user's code snapshot records the commit of a checkout it does not own (git refuses such a checkout unless
told to trust it). The second user runs the project with Debian's python3 and the venv's packages on PYTHONPATH:
root's interpreter may live where no one else can read (pyenv under /root)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import pytest

from helpers import REPO, SHAKESPEARE, wait_until
from test_detached import steps_done, verb
from test_preemption import RUN, Job, attempts
from slurm_helpers import SLURM

pytestmark = pytest.mark.slurm

PYTHON = "/usr/bin/python3"  # Debian's: the same 3.11 as the venv's, readable by every user
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class OtherUser:
    """The cluster's second user: a folder of its own, and commands run as it."""

    def __init__(self, name: str, slurm_conf: str, home: Path):
        self.name, self.home = name, home
        packages = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], str(REPO)])
        self.env = {"PATH": PATH, "SLURM_CONF": slurm_conf, "HOME": str(home), "LANG": "C.UTF-8",
                    "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": ":".join(packages)}

    def argv(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", self.name, "--", "env", "-i", *(f"{k}={v}" for k, v in self.env.items()), *cmd]

    def start(self, *cmd: str, out: Path) -> subprocess.Popen:
        with out.open("w") as f:
            return subprocess.Popen(self.argv(*cmd), cwd=self.home, stdout=f, stderr=subprocess.STDOUT)

    def verb(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(PYTHON, "-m", f"launch.{name}", *args), cwd=self.home, capture_output=True,
                              text=True, timeout=120)


@contextlib.contextmanager
def readable_by(user: str, *paths: Path):
    """Let `user` reach `paths`: an ACL entry (traverse only) on each folder above them that others cannot enter,
    removed afterwards. A checkout under /root, say; the clone itself is readable by all (git's umask)."""
    granted = []
    try:
        for path in paths:
            for folder in reversed(path.resolve().parents):
                if not os.stat(folder).st_mode & 0o001 and folder not in granted:
                    subprocess.run(["setfacl", "-m", f"u:{user}:x", str(folder)], check=True)
                    granted.append(folder)
        yield
    finally:
        for folder in granted:
            subprocess.run(["setfacl", "-x", f"u:{user}", str(folder)], check=False)


@pytest.fixture
def other_user(slurm_cluster):
    names = dict(line.split("=", 1) for line in slurm_cluster.script("describe").stdout.splitlines() if "=" in line)
    assert "OTHER_USER" in names, "this cluster predates its second user: slurm/local_cluster.sh down, then up"
    home = Path(tempfile.mkdtemp(prefix="gl-other-"))
    shutil.chown(home, names["OTHER_USER"], names["OTHER_USER"])
    try:
        with readable_by(names["OTHER_USER"], REPO, Path(sysconfig.get_paths()["purelib"])):
            yield OtherUser(names["OTHER_USER"], str(slurm_cluster.conf), home)
    finally:  # a failed test's jobs must not hold the nodes of the next
        slurm_cluster.run("scancel", "-u", names["OTHER_USER"], check=False)
        shutil.rmtree(home, ignore_errors=True)


def writable_by_others(folder: Path) -> list[str]:
    return [str(p) for p in [folder, *folder.rglob("*")] if not p.is_symlink() and p.stat().st_mode & 0o022]


@pytest.mark.timeout(300)
def test_two_users_run_the_same_run_name_beside_each_other_and_neither_can_take_or_stop_the_others(
        slurm_cluster, tmp_path, other_user):
    shared = other_user.home / "shared-data"  # root's, prepared by its run and readable by all
    shared.mkdir(mode=0o755)
    text = shutil.copy(SHAKESPEARE, shared / "input.txt")
    data = [f"data.text_path={text}", f"data.dir={shared / 'shakespeare_char'}"]
    mine = Job(slurm_cluster, tmp_path, ["nodes=2", "run=twin", *SLURM, *RUN, *data], tmp_path / "run")
    mine.id()  # submitted: the data is prepared
    theirs_dir = other_user.home / "run"
    longer = [o for o in RUN if not o.startswith("train.max_steps")] + ["train.max_steps=2000"]
    theirs = other_user.start(PYTHON, "-m", "launch", "nodes=2", "run=twin", *SLURM, *longer, *data,
                              f"hydra.run.dir={theirs_dir}", out=tmp_path / "theirs.out")
    try:
        wait_until(lambda: steps_done(theirs_dir) > 0, what="the second user's run to train")
        assert mine.wait() == 0, mine.text()
        (only,) = attempts(mine.run_dir)
        assert only["ended"] == "finished", only
        theirs_job = json.loads((theirs_dir / "slurm_job.json").read_text())["job_id"]
        names = {slurm_cluster.job_info(job)["JobName"] for job in (mine.id(), theirs_job)}
        assert len(names) == 1, names  # one job name: the run's and the config's, not the user's

        # Root sees the other user's run folder, and neither lists its job as its own nor stops it.
        listed = verb(slurm_cluster.env, "list", str(other_user.home))
        assert "RUNNING (another user's job)" in listed.stdout, listed
        refused = verb(slurm_cluster.env, "cancel", str(theirs_dir))
        assert refused.returncode == 2 and "another user" in refused.stderr, refused
        assert not (theirs_dir / "cancel.json").exists()
        assert theirs.poll() is None and steps_done(theirs_dir) < 2000

        # Its owner lists it as its own and cancels it: saved, and ended.
        own = other_user.verb("list", str(other_user.home))
        assert "RUNNING" in own.stdout and "another user" not in own.stdout, own
        cancel = other_user.verb("cancel", str(theirs_dir))
        assert cancel.returncode == 0 and "sent the preemption signal" in cancel.stdout, cancel
        theirs.wait(timeout=120)
    finally:
        if theirs.poll() is None:
            theirs.kill()
    assert attempts(theirs_dir)[-1]["ended"] == "cancelled by the user", (tmp_path / "theirs.out").read_text()

    for run_dir, owner in ((mine.run_dir, 0), (theirs_dir, other_user.home.stat().st_uid)):
        assert writable_by_others(run_dir) == []
        assert (run_dir / "watchdog" / "node-secret").stat().st_mode & 0o077 == 0
        assert {p.stat().st_uid for p in run_dir.rglob("*") if not p.is_symlink()} == {owner}  # no root-written file
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    recorded = json.loads((theirs_dir / "code.json").read_text())["commit"]
    assert recorded == (head.stdout.strip() if head.returncode == 0 else None), recorded
