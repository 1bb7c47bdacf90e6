"""A save is long, not hung, while its bytes move. Each rank writes its own shards to its own node's view of the
storage, so one rank's save can outlast the budget its peers measured on their own saves (a busy file server, a
node whose page cache is full). The watchdog (launch.recovery.watchdog) therefore counts a rank's save budget from
the last time its save wrote (WriteWatch), and a rank past its budget waits for a peer that still saves within its
own (slower_savers): that peer's own watchdog speaks if its save stops writing. Torch-free.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

from launch.recovery.heartbeat import Liveness

SAVES = ("save", "finish")  # the phases whose length differs by rank: each writes its own shards
HOUSEKEEPING = "gptlaunch-"  # the threads named so keep the run alive (heartbeats, the lease, the step flags)


class WriteWatch:
    """Whether this process's working threads (the main thread, a checkpoint's writer threads: any Python thread
    not named HOUSEKEEPING) passed bytes to write(2) since the last look: Linux's per-thread counters
    (/proc/self/task/TID/io, wchar), which count a write into the page cache as soon as it is made. Where they cannot
    be read (not Linux), nothing is seen to move."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def moved(self) -> bool:
        now: dict[int, int] = {}
        for thread in threading.enumerate():
            if thread.native_id is not None and not thread.name.startswith(HOUSEKEEPING):
                written = _written(thread.native_id)
                if written is not None:
                    now[thread.native_id] = written
        # a thread first seen now (a save's writer started since the last look) moved if it wrote at all
        moved = bool(self.seen) and any(n > self.seen.get(tid, 0) for tid, n in now.items())
        self.seen = now
        return moved


def _written(tid: int) -> int | None:
    try:
        with open(f"/proc/self/task/{tid}/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):  # the thread ended meanwhile, or no such file here
        return None
    return None


def slower_savers(beats: Sequence[dict | None], liveness: Liveness, rank: int, stale_s: float) -> list[int]:
    """The peers a rank past its budget in a save still waits for: each in a save, in no collective (it works on
    its own shards), its heartbeat live (moved within `stale_s` on the observer's clock) and its own budget not
    spent (`budget_left_s` of its last beat, less the time since that beat)."""
    slower = []
    for r, b in enumerate(beats):
        silent = liveness.silent_s(r)
        if (r != rank and b is not None and silent is not None and silent < stale_s and not b.get("ended")
                and b.get("kind") in SAVES and b.get("collective") is None
                and float(b.get("budget_left_s", 0.0)) > silent):
            slower.append(r)
    return slower
