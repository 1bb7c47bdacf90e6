"""The rank's open-file limit, raised to its hard limit as the rank starts (torch-free).

Every socket is a file. A rank holds one per peer its collectives talk to, and rank 0 also serves the job's store
(a socket per rank) and receives the gathers (a socket per rank on gloo): a soft limit of 1,024, a common default
below hard limits of 65,536 and more, refuses a job of about a thousand ranks, where nothing but the soft limit
was in the way."""
from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NR_OPEN = Path("/proc/sys/fs/nr_open")  # Linux's ceiling when the hard limit is "unlimited"
# What rank 0 opens per rank of the job: the store server's socket, and one on each of the default group and the
# async-checkpoint group, which gather to it (benchmarks/startup_scale.py measures it).
RANK0_FILES_PER_RANK = 3
OTHER_FILES = 1024  # libraries, data, logs, TensorBoard, the checkpoint's files


@dataclass(frozen=True)
class OpenFiles:
    before: int
    now: int

    def describe(self) -> str:
        if self.now == self.before:
            return f"open files: soft limit {self.now} (the hard limit)"
        return f"open files: soft limit {self.before}, raised to the hard limit {self.now}"

    def short_for(self, world_size: int) -> str | None:
        """A warning when rank 0 may run out of files in a job of `world_size` ranks, else None."""
        needed = RANK0_FILES_PER_RANK * world_size + OTHER_FILES
        if self.now >= needed:
            return None
        return (f"open files: rank 0 may need about {needed} at {world_size} ranks and may open {self.now} (the hard "
                "limit): ask the site to raise nofile (limits.conf, or the Slurm daemon's LimitNOFILE)")


def raise_open_files() -> OpenFiles:
    """The soft limit of open files raised to the hard limit (a process may, unprivileged)."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    now = before
    if before != resource.RLIM_INFINITY and before < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            now = target
        except (ValueError, OSError):  # a container's ceiling below its stated hard limit: keep what we have
            pass
    return OpenFiles(before, now)


def raised_for(world_size: int, is_main: bool) -> str:
    """Raise the limit before the rank opens its sockets, and say the limit; rank 0 warns where the job's size may
    still exhaust it."""
    files = raise_open_files()
    if is_main and (short := files.short_for(world_size)):
        log.warning("%s", short)
    return files.describe()


def _nr_open() -> int:
    try:
        return int(NR_OPEN.read_text())
    except (OSError, ValueError):
        return 1 << 20  # Linux's default nr_open
