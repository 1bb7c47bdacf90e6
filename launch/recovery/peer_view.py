"""What several processes of a node would each read of the run folder, read once per node. Every rank of a node stuck
in the same collective would otherwise read every node's heartbeat record (and look for a hang report) each interval,
ranks times nodes reads of the shared file system per second exactly while the job is stuck; every task wrapper would
look for its round's next round each second, and for its attempt's line every few. The first process to find this
node's copy older than its age reads the run folder and leaves what it saw in node-local memory (next to the node's
beats, in NodeHeartbeat's private folder); the others read that copy. One process fetches at a time (a lock in the
same folder); one that waits longer than the age for the lock takes the copy as it is, or fetches itself when there is
none. Torch-free.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PREFIX = "view-"  # this module's files in the node's folder: view-<name>.json and its lock


class NodeView:
    """`read(key, fetch)`: what `fetch()` returns (plain JSON), fetched at most once per `max_age_s` on this node for
    a given `key` (the attempt's: an earlier one's copy is never taken for this one's)."""

    def __init__(self, local: Path, max_age_s: float, name: str):
        self.path, self.lock = local / f"{PREFIX}{name}.json", local / f"{PREFIX}{name}.lock"
        self.max_age_s = max_age_s

    def read(self, key: Any, fetch: Callable[[], Any]) -> Any:
        try:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # the node's folder is not there (its beat failed): this rank reads alone
            return fetch()
        try:
            locked = self._lock(fd)
            kept = self._kept(key)
            if kept is not None and (not locked or 0 <= time.monotonic() - kept["at"] < self.max_age_s):
                return kept["seen"]
            seen = fetch()
            if locked:
                self._keep(key, seen)
            return seen
        finally:
            os.close(fd)  # and with it the lock

    def _lock(self, fd: int) -> bool:
        """Whether this rank got the lock within max_age_s (a peer fetching from a storage that hangs holds it)."""
        deadline = time.monotonic() + self.max_age_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)

    def _kept(self, key: Any) -> dict | None:
        try:
            kept = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return kept if isinstance(kept, dict) and kept.get("key") == json.loads(json.dumps(key)) else None

    def _keep(self, key: Any, seen: Any) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"key": key, "at": time.monotonic(), "seen": seen}))
            os.replace(tmp, self.path)
        except OSError:  # node memory full: the node's other ranks fetch for themselves
            tmp.unlink(missing_ok=True)


def release(local: Path) -> None:
    """A process of the node ends: once no rank of the node beats there (rank*.json), the views go, and the folder
    with its parent when they are empty (memory, not disk: one left behind per run would fill /dev/shm)."""
    try:
        if not any(local.glob("rank*.json")):
            for path in local.glob(f"{PREFIX}*"):
                path.unlink(missing_ok=True)
        for folder in (local, local.parent):
            folder.rmdir()
    except OSError:  # another process of this node (or run) still uses it
        pass
