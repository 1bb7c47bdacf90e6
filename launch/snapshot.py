"""Code snapshots: the code a submitted job runs, fixed at submission.

A job may wait in the queue for hours, and requeue days later; a user edits the checkout meanwhile. At submission
the package and its configs (the files git tracks at HEAD with the uncommitted changes, and new files git does not
ignore; a plain copy where there is no git) are copied into the submission folder, and every attempt of the job
imports them: the batch script puts the snapshot first on PYTHONPATH, and PYTHONSAFEPATH keeps `python -m` from
putting the working directory (the checkout) before it. `code.json` beside it records the commit and whether the
checkout was dirty; the uncommitted changes are kept as `uncommitted.diff`. `hydra.launcher.snapshot=false` opts out.
Torch-free.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gpt.run_folder import RunFolder, write_json
from launch.backends import Point

ROOT = Path(__file__).resolve().parents[1]  # the checkout (or the installed tree) this launcher runs from
PARTS = ("gpt", "launch", "configs", "hydra_plugins")  # what a job imports and reads
RECORD = "code.json"


@dataclass(frozen=True)
class Snapshot:
    path: Path  # holds gpt/, launch/, configs/, hydra_plugins/
    commit: str | None  # None: not a git checkout
    dirty: bool  # uncommitted changes (or files git does not know yet) went into it

    def setup_lines(self) -> tuple[str, ...]:
        """Batch-script lines that make every process of the job import the snapshot (its path quoted: a space would
        split it, and the job would import whatever else is on the path; a `$(...)` in a run name would run)."""
        return (f'export PYTHONPATH={shlex.quote(str(self.path))}"${{PYTHONPATH:+:$PYTHONPATH}}"',
                "export PYTHONSAFEPATH=1")

    def record(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def take(folder: Path, root: Path = ROOT) -> Snapshot:
    """A new snapshot under folder/code/ (earlier ones stay: jobs still waiting may run them). Its name is claimed
    first (an empty folder: a sweep submitted into the same folder in the same second takes the next name), and it
    is filled under a name of its own, then renamed onto the claim: a job never sees a part of it."""
    stamp, code = time.strftime("%Y%m%d-%H%M%S"), folder / "code"
    code.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        dest = code / (f"{stamp}.{n}" if n else stamp)
        try:
            dest.mkdir()
            break
        except FileExistsError:
            continue
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=code))
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        for part in PARTS:
            if (root / part).is_dir():
                shutil.copytree(root / part, tmp / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        dirty = False
    else:
        dirty = _copy_git_files(root, tmp)
        (tmp / "uncommitted.diff").write_text(_git(root, "diff", "HEAD", "--binary", "--", *PARTS) or "")
    snapshot = Snapshot(dest, commit.strip() if commit else None, dirty)
    (tmp / RECORD).write_text(json.dumps(snapshot.record(), indent=1))
    tmp.rename(dest)
    return snapshot


def _copy_git_files(root: Path, dest: Path) -> bool:
    """Copy the working-tree files of PARTS that git tracks or would track; whether any differ from HEAD."""
    listed = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *PARTS) or ""
    for name in filter(None, listed.split("\0")):
        src = root / name
        if src.is_file():  # a tracked file deleted in the checkout is left out, as the diff has it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return bool(_git(root, "status", "--porcelain", "--", *PARTS))


def _git(root: Path, *args: str) -> str | None:
    """git's answer in the checkout, or None. The checkout may be another user's (a group's shared install), which
    git refuses as of dubious ownership: it is trusted for these reads, since this launcher already runs its code."""
    try:
        proc = subprocess.run(["git", "-c", f"safe.directory={root}", "-C", str(root), *args], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def record_in(run_dir: Path, snapshot: Snapshot) -> None:
    """The run folder names the code its newest submission runs (code.json)."""
    write_json(RunFolder(run_dir).code, snapshot.record(), indent=1)


def with_snapshot(point: Point, snapshot: Snapshot) -> Point:
    """The point with its job's batch script running the snapshot (its resources' setup lines come first)."""
    resources = dataclasses.replace(point.resources, setup=(*snapshot.setup_lines(), *point.resources.setup))
    return dataclasses.replace(point, resources=resources)
