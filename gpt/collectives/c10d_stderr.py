"""torch's c10d writes one harmless warning on every rank of a multi-node job; it is left out of the rank's log.

When a rank connects to the job's TCP store, c10d formats the socket's addresses with a reverse lookup
(getnameinfo) of an address it reads wrongly (its INFO line shows nonsense IPv6 addresses); on a node whose resolver
cannot answer (no DNS server reachable, as on many compute nodes and on the test cluster's), the lookup fails with
EAI_AGAIN and c10d warns `[c10d] The hostname of the client socket cannot be retrieved. err=-3`. Nothing is wrong
with the job: the lookup only decorates a log line. The warning comes from C++ straight to file descriptor 2, so no
Python filter sees it: while the store connects (up to rendezvous.timeout_s), fd 2 goes through a pipe whose reader
passes every other line on as it comes, so a rank killed meanwhile (its watchdog's last words included) loses none.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

HOSTNAME_WARNING = b"The hostname of the client socket cannot be retrieved"


@contextlib.contextmanager
def without_hostname_warning() -> Iterator[None]:
    """fd 2 without c10d's hostname warning while the block runs; every other line is written on at once."""
    _FILTER.enter()
    try:
        yield
    finally:
        _FILTER.leave()


class _Filter:
    """One pipe for the process, however many threads connect at once (fd 2 is the process's: ranks simulated as
    threads, benchmarks/startup_scale.py, would otherwise swap it under each other); the last to leave restores it."""

    def __init__(self) -> None:
        self.lock, self.users = threading.Lock(), 0
        self.saved: int | None = None
        self.reader: threading.Thread | None = None

    def enter(self) -> None:
        with self.lock:
            self.users += 1
            if self.users > 1:
                return
            sys.stderr.flush()
            self.saved = os.dup(2)
            read, write = os.pipe()
            self.reader = threading.Thread(target=_pass_on, args=(read, os.dup(self.saved)), daemon=True,
                                           name="gptlaunch-c10d-stderr")
            self.reader.start()
            os.dup2(write, 2)
            os.close(write)

    def leave(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users:
                return
            sys.stderr.flush()
            os.dup2(self.saved, 2)  # the pipe's last writer is gone: the reader reads to its end
            self.reader.join(timeout=5.0)  # a process forked meanwhile may hold the pipe: the reader ends with it
            os.close(self.saved)


_FILTER = _Filter()


def _pass_on(read: int, out: int) -> None:
    with os.fdopen(read, "rb", buffering=0) as pipe, os.fdopen(out, "wb", buffering=0) as to:
        for line in iter(pipe.readline, b""):
            if HOSTNAME_WARNING not in line:
                to.write(line)
