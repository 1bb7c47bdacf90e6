"""One heartbeat record per node in the run folder, RUN_DIR/watchdog/node-<host>.json, instead of a file per rank:
the shared file system's metadata server sees at most one operation per node per second, whatever the number of
ranks per node.

Every rank writes its beat into node-local memory (/dev/shm/gptlaunch-<key>/<host>/rank<R>.json; creates and
renames there never reach the shared file system). The key hashes the run folder with the run's secret
(watchdog/node-secret, readable by this user alone), and the folder is this user's alone (mode 0700, checked at
every beat): another user of a shared node can neither guess it, nor make it first, nor write in it. One of the
ranks, the node's writer, copies every local rank's beat of this attempt into the node's record at each of its own
beats. The record is rewritten in place through a file
descriptor kept open: a write and a flush to the file server (data, not metadata), no create, open or rename. The
only metadata operation left per beat is the writer's fence (a lookup of the next generation's claim). The writer
is the lowest local rank whose beat moved within WRITER_SILENT_BEATS intervals on this rank's own clock: a writer
killed or frozen is replaced within those intervals, well inside the silence that calls a rank gone. Torch-free.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

from gpt.errors import UserError
from launch.recovery.heartbeat import Liveness, of_attempt
from launch.recovery.peer_view import release
from gpt.resilience.lease import fence
from gpt.run_folder import RunFolder

WRITER_SILENT_BEATS = 3  # a local writer whose beat has not moved for this many intervals is replaced
# A node-local folder in which no rank has beaten for this long belongs to a run gone from this node (a killed rank's,
# on a node its run never came back to): a rank starting on the node removes it, or node memory would keep it for good.
STALE_LOCAL_S = 24 * 3600.0
LOCAL_NAME = re.compile(r"^gptlaunch-[0-9a-f]{32}$")  # node_local_dir's folders, and nothing else of gptlaunch's


def node_local_dir(run_dir: Path, host: str) -> Path:
    """This node's folder of local beats: memory (/dev/shm) where there is one. Its name holds the run's secret, so
    that another user of the node can neither find it nor make it first; `private_folder` checks it is this user's."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    key = hashlib.sha256(f"{Path(run_dir).resolve()}\0{run_secret(run_dir)}".encode()).hexdigest()[:32]
    return base / f"gptlaunch-{key}" / host


def sweep_stale(base: Path, now: float) -> list[Path]:
    """Remove this user's node-local folders under `base` whose newest beat is older than STALE_LOCAL_S; those
    removed. A live run beats every few seconds, and a run frozen for longer makes its folder again at its next beat."""
    removed = []
    for folder in base.glob("gptlaunch-*"):
        try:
            st = os.lstat(folder)
            if not LOCAL_NAME.match(folder.name) or st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
                continue
            newest = max([st.st_mtime, *(os.lstat(p).st_mtime for p in folder.rglob("*"))])
        except OSError:  # another rank's sweep or close came first
            continue
        if now - newest > STALE_LOCAL_S:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def run_secret(run_dir: Path) -> str:
    """The run's secret, made by the first rank that asks: a file only this user can read, linked into place whole
    (every rank of every attempt reads the same one)."""
    path = RunFolder(run_dir).node_secret
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_hex(16))
        try:
            os.link(tmp, path)
        except FileExistsError:  # another rank's came first: every rank reads that one
            pass
        finally:
            tmp.unlink()
    with open(path, opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW)) as f:
        _check_private(path, os.fstat(f.fileno()), 0o600)
        return f.read().strip()


def private_folder(folder: Path) -> None:
    """Make `folder` for this user alone (mode 0700), or check that the one there is: a folder another user made or
    opened to others is refused, since whoever can write in it can stop or fool this run's watchdog."""
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    _check_private(folder, os.lstat(folder), 0o700)  # a link's own mode is open to all: refused too


def _check_private(path: Path, st: os.stat_result, mode: int) -> None:
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        wanted = stat.filemode(stat.S_IFMT(st.st_mode) | mode)
        raise UserError(f"{path} belongs to uid {st.st_uid} with mode {stat.filemode(st.st_mode)}: another user could "
                        f"stop or fool this run's watchdog through it; it must be uid {os.getuid()}'s with mode "
                        f"{wanted} (remove it, and run again)")


class NodeHeartbeat:
    """A rank's beats through its node: `beat(record)` every interval; the node's writer publishes them all."""

    def __init__(self, run_dir: Path, host: str, rank: int, interval_s: float):
        self.run_dir, self.host, self.rank, self.interval_s = run_dir, host, rank, interval_s
        self.local = node_local_dir(run_dir, host)
        sweep_stale(self.local.parent.parent, time.time())
        self.local_ranks = Liveness()  # this node's ranks, judged on this rank's clock
        self.fd: int | None = None  # the node's record, kept open while this rank is the writer
        self.written = 0  # the record's length: a shorter one is padded, so that no truncate is needed
        self.lock = threading.Lock()  # the watchdog thread beats while the main thread ends the heartbeat
        self.closed = False
        atexit.register(self.close)  # a killed rank's file stays: the next attempt's writer removes it

    @property
    def path(self) -> Path:
        return self.local / f"rank{self.rank}.json"

    def beat(self, record: dict) -> None:
        with self.lock:
            if self.closed:
                return
            private_folder(self.local.parent)
            self.local.mkdir(exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path)
            ours = self._local_beats(record)
            if self._is_writer(ours):
                fence()  # an orphan writer of an attempt that lost the run folder stops here
                self._publish(ours)
            else:
                self._close()

    def _local_beats(self, mine: dict) -> dict[int, dict]:
        """This attempt's beats of the ranks on this node. An earlier attempt's files go: the node's memory keeps
        one file per rank of a run's last attempt, not one per attempt."""
        beats = {}
        for path in self.local.glob("rank*.json"):
            try:
                beat = json.loads(path.read_text())
            except (OSError, ValueError):  # a rank's file being replaced: its next beat counts
                continue
            if of_attempt(beat, mine.get("attempt"), mine.get("restart"), mine.get("generation")):
                beats[int(path.stem[4:])] = beat
            else:
                path.unlink(missing_ok=True)
        return beats

    def _is_writer(self, beats: dict[int, dict]) -> bool:
        top = max(beats, default=self.rank)
        self.local_ranks.observe([beats.get(r) for r in range(top + 1)])
        silent = WRITER_SILENT_BEATS * self.interval_s
        live = [r for r in beats if r == self.rank or (self.local_ranks.silent_s(r) or 0.0) <= silent]
        return min(live) == self.rank

    def _publish(self, beats: dict[int, dict]) -> None:
        if self.fd is None:
            path = RunFolder(self.run_dir).node_heartbeat(self.host)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            self.written = os.fstat(self.fd).st_size  # an earlier attempt's (or writer's) longer record is padded over
        text = json.dumps({"host": self.host, "writer": self.rank, "time": time.time(),
                           "ranks": {str(r): b for r, b in sorted(beats.items())}})
        data = text.encode().ljust(self.written)  # trailing spaces: still the same JSON
        os.pwrite(self.fd, data, 0)
        os.fdatasync(self.fd)  # other hosts see it now: an NFS client would hold a file it keeps open in its cache
        self.written = len(data)

    def close(self) -> None:
        """The rank exits: its local beat goes, and with the node's last one the run's folder (memory, not disk:
        one left behind per run would fill /dev/shm). The rank's last beat is in its own file in the run folder."""
        with self.lock:
            self.closed = True
            self._close()
            self.path.unlink(missing_ok=True)
            release(self.local)  # with the node's last rank, what its processes shared (launch.recovery.peer_view)

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
