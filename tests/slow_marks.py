"""A test that trains through `python -m launch` is marked `slow` (or `slurm`), so that `make test-fast` (not slow,
not slurm) stays a quick slice: tests/conftest.py checks every other test with `TrainingWatch`.

A test trains when a `python -m launch` it started (in its fixtures too) left a run folder with training records
under the `hydra.run.dir` / `hydra.sweep.dir` it named. A launch refused before any rank (bad input) leaves none.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

EXEMPT_MARKS = ("slow", "slurm")


def run_folders(argv: list[str]) -> list[Path]:
    """The run (or sweep) folders a `python -m launch` command line names; none for any other command."""
    if "launch" not in argv or argv[argv.index("launch") - 1] != "-m":
        return []
    return [Path(a.split("=", 1)[1]) for a in argv if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]


def trained(folder: Path) -> bool:
    """Whether some rank under `folder` recorded a training step (the run folder's metrics/rank<R>.jsonl)."""
    for metrics in folder.glob("**/metrics/rank*.jsonl"):
        for line in metrics.read_text().splitlines():
            try:
                if json.loads(line).get("kind") == "train":
                    return True
            except json.JSONDecodeError:
                continue  # a line cut short by a killed rank
    return False


class TrainingWatch:
    """Records the run folders of the `python -m launch` commands this process starts while it is installed."""

    def __init__(self):
        self.folders: list[Path] = []
        self._init = None

    def install(self) -> None:
        original = self._init = subprocess.Popen.__init__
        folders = self.folders

        def init(popen, args, *rest, **kwargs):
            argv = [str(a) for a in args] if isinstance(args, list | tuple) else str(args).split()
            folders.extend(run_folders(argv))
            original(popen, args, *rest, **kwargs)

        subprocess.Popen.__init__ = init

    def uninstall(self) -> None:
        subprocess.Popen.__init__ = self._init

    def problem(self, nodeid: str) -> str | None:
        """The line that fails an unmarked test which trained, or None."""
        runs = [f for f in dict.fromkeys(self.folders) if trained(f)]
        if not runs:
            return None
        return (f"{nodeid} trains through `python -m launch` (in {runs[0]}) but is not marked slow: "
                f"add @pytest.mark.slow, so that `make test-fast` stays quick")
