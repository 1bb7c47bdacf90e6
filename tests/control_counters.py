"""What the control plane costs, counted from outside the code under test (tests and benchmarks/control_plane.py).

SlurmCalls: a folder of shims named like Slurm's client commands, put first on PATH. The launcher's environment
reaches the job (sbatch exports it) and every rank's task, so each client call anyone makes (the waiter on the
login node, a rank's requeue) appends one line, "time<TAB>caller pid<TAB>host<TAB>command args", to calls.log,
then execs the real command. srun is left out: it starts the job's steps, it does not poll the controller.

FsOps: the metadata operations in a folder tree, seen through inotify (Linux's own file-event API, used through
ctypes: no dependency). The local cluster's nodes share this machine's file system, so one watcher sees every node's
writes. One metadata operation is one of: a create (file or folder; the open that creates a file is the same
operation), an open (for reading or writing, a folder's listing included), a rename (its two events counted once),
an unlink or rmdir, an attribute change (chmod, utime, truncate). Writes to a file already open are data, not
metadata (a Lustre OST's work, not the MDS's). inotify cannot see stat(2) or a lookup of a name that does not exist:
these are left out of the count, and said so where a figure is given.
"""
from __future__ import annotations

import ctypes
import os
import select
import shutil
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SLURM_CLIENTS = ("scontrol", "squeue", "sbatch", "sacct", "scancel", "sinfo")

SHIM = """#!/bin/bash
printf '%s\\t%s\\t%s\\t%s\\n' "$EPOCHREALTIME" "$PPID" "${{SLURMD_NODENAME:-$(hostname)}}" "{name} $*" >> {log}
exec {real} "$@"
"""


@dataclass(frozen=True)
class SlurmCall:
    time: float
    pid: int  # the caller's
    host: str
    argv: str  # the command and its arguments, joined by spaces

    @property
    def command(self) -> str:
        return self.argv.split(" ", 1)[0]


@dataclass
class SlurmCalls:
    """Shims for Slurm's client commands in `folder` (the real ones found on `path`, else on this PATH);
    `env(base)` puts them first on base's PATH."""

    folder: Path
    path: str | None = None

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        for name in SLURM_CLIENTS:
            real = shutil.which(name, path=self.path)
            if real is None:
                raise FileNotFoundError(f"{name} is not on PATH: the shims need the real command")
            shim = self.folder / name
            shim.write_text(SHIM.format(log=self.log, real=real, name=name))
            shim.chmod(0o755)

    @property
    def log(self) -> Path:
        return self.folder / "calls.log"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "PATH": f"{self.folder}:{base.get('PATH', '')}"}

    def calls(self, since: float = 0.0, until: float = float("inf")) -> list[SlurmCall]:
        out = []
        for line in self.log.read_text().splitlines():
            when, pid, host, argv = (line.split("\t", 3) + [""] * 4)[:4]
            call = SlurmCall(float(when), int(pid), host, argv)
            if since <= call.time <= until:
                out.append(call)
        return out

    def by_command(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        return Counter(c.command for c in self.calls(since, until))


# inotify(7): the events counted, and the two that keep the watch list whole
IN_ATTRIB = 0x4
IN_OPEN, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x20, 0x40, 0x80, 0x100, 0x200
IN_Q_OVERFLOW, IN_ISDIR = 0x4000, 0x40000000
WATCHED = IN_ATTRIB | IN_OPEN | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
KINDS = {IN_CREATE: "create", IN_OPEN: "open", IN_MOVED_TO: "rename", IN_DELETE: "unlink", IN_ATTRIB: "attrib"}
EVENT = struct.Struct("iIII")


@dataclass(frozen=True)
class FsOp:
    time: float
    kind: str  # create, open, rename, unlink, attrib
    path: str  # relative to the watched root


@dataclass
class FsOps:
    """Counts the metadata operations under `root` (every folder, those created later too) while started."""

    root: Path
    ops: list[FsOp] = field(default_factory=list)
    overflowed: bool = False

    def __enter__(self) -> FsOps:
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._dirs: dict[int, Path] = {}
        for folder, _, _ in os.walk(self.root):
            self._watch(Path(folder))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="fs-ops", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)

    def _watch(self, folder: Path) -> None:
        wd = self._libc.inotify_add_watch(self._fd, str(folder).encode(), WATCHED)
        if wd >= 0:  # a folder gone already: nothing to count in it
            self._dirs[wd] = folder

    def _read(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._fd], [], [], 0.2)[0]:
                continue
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                continue
            self._parse(data, time.time())

    def _parse(self, data: bytes, now: float) -> None:
        offset = 0
        while offset < len(data):
            wd, mask, _cookie, size = EVENT.unpack_from(data, offset)
            name = data[offset + EVENT.size: offset + EVENT.size + size].rstrip(b"\0").decode(errors="replace")
            offset += EVENT.size + size
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True
                continue
            folder = self._dirs.get(wd)
            if folder is None:
                continue
            path = folder / name if name else folder
            if mask & IN_CREATE and mask & IN_ISDIR:  # and what was made in it before its watch was added
                for folder_in, _, _ in os.walk(path):
                    self._watch(Path(folder_in))
            kind = next((k for bit, k in KINDS.items() if mask & bit), None)
            # a watched folder reports its own opens (nameless) and its parent reports them too: count one
            if kind is None or not (name or folder == self.root):
                continue
            op = FsOp(now, kind, os.path.relpath(path, self.root))
            if kind == "open" and self.ops and (self.ops[-1].kind, self.ops[-1].path) == ("create", op.path):
                continue  # open(O_CREAT) of a new file: one operation (one RPC to a Lustre MDS), two events
            self.ops.append(op)

    def window(self, since: float, until: float) -> list[FsOp]:
        return [op for op in self.ops if since <= op.time <= until]

    def per_second(self, since: float, until: float) -> float:
        return len(self.window(since, until)) / (until - since)

    def by_path(self, since: float, until: float) -> Counter[str]:
        return Counter(f"{op.kind} {op.path}" for op in self.window(since, until))
