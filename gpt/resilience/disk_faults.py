"""Writers beside the checkpoint (the metrics JSONL, TensorBoard events, a rank's log file, the lease's beat) on a
disk that fills, a quota, a read-only folder: the first failed write says one line naming the folder and the
cause, the writer goes on without what it cannot write, and says once more when it writes again. Training goes on:
only a checkpoint holds the run's state, and the next save meets the same disk and decides by
checkpoint.on_save_error. Torch-free (the lease uses it on the launcher's side too)."""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

WHY = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
       errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied (a read-only folder?)",
       errno.EPERM: "operation not permitted (a read-only or immutable folder?)"}


def cause(e: OSError) -> str:
    """An OSError's cause in words: 'the disk is full', or the system's own message."""
    return WHY.get(e.errno, e.strerror or str(e))


def os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e` (itself, or what it was raised from or during): a library may wrap it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class Outage:
    """One writer's storage outage, said once: `failed` at its first failed write, `recovered` at the next write
    that goes in. `then` says what the run does meanwhile."""

    def __init__(self, what: str, folder: Path, then: str):
        self.what, self.folder, self.then = what, folder, then
        self.down = False

    def failed(self, e: OSError) -> None:
        if self.down:
            return
        self.down = True  # first: the line below may go through a writer that fails again (a rank's log file)
        log.warning("cannot write %s in %s: %s; %s", self.what, self.folder, cause(e), self.then)

    def recovered(self) -> None:
        if self.down:
            self.down = False
            log.info("%s in %s is written again", self.what, self.folder)


class LogFile(logging.FileHandler):
    """A log file in the run folder (a rank's; the launcher's, as Hydra's job logging's file handler): a line it
    cannot write is dropped, said once on the console, never logging's "--- Logging error ---" traceback for each
    line."""

    def __init__(self, filename: str | Path, mode: str = "a", encoding: str | None = None, delay: bool = False):
        super().__init__(filename, mode, encoding, delay)
        self.outage = Outage("the log file", Path(filename).parent, "its lines go to the console only")

    def handleError(self, record: logging.LogRecord) -> None:
        e = sys.exc_info()[1]
        if isinstance(e, OSError):
            self.outage.failed(e)
        else:
            super().handleError(record)

    def close(self) -> None:
        """The last buffered lines flushed at close may find the disk full too: dropped as any other line."""
        try:
            super().close()
        except OSError as e:
            self.outage.failed(e)


class RecordFile:
    """An append-only file that holds whole records only: a record the disk takes in part is cut off again (which
    frees, so it cannot fail for want of room), and the file goes on from its last whole record once there is room.
    One write per record to a file kept open: no metadata operation after the open."""

    def __init__(self, path: Path, outage: Outage):
        self.outage = outage
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size = os.fstat(self.fd).st_size

    def append(self, data: bytes) -> bool:
        """Whether the record went in."""
        view, written = memoryview(data), 0
        try:
            while written < len(view):  # a nearly full disk takes part of it, then refuses the rest
                written += os.write(self.fd, view[written:])
        except OSError as e:
            os.ftruncate(self.fd, self.size)
            self.outage.failed(e)
            return False
        self.size += written
        self.outage.recovered()
        return True

    def close(self) -> None:
        os.close(self.fd)
