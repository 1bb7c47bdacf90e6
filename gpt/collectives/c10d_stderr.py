"""torch's c10d writes one harmless warning on every rank of a multi-node job; it is left out of the rank's log.

When a rank connects to the job's TCP store, c10d formats the socket's addresses with a reverse lookup
(getnameinfo) of an address it reads wrongly (its INFO line shows nonsense IPv6 addresses); on a node whose resolver
cannot answer (no DNS server reachable, as on many compute nodes and on the test cluster's), the lookup fails with
EAI_AGAIN and c10d warns `[c10d] The hostname of the client socket cannot be retrieved. err=-3`. Nothing is wrong
with the job: the lookup only decorates a log line. The warning comes from C++ straight to file descriptor 2, so no
Python filter sees it: while the store connects, fd 2 goes to a temporary file, and every other line is passed on.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

HOSTNAME_WARNING = b"The hostname of the client socket cannot be retrieved"


@contextlib.contextmanager
def without_hostname_warning() -> Iterator[None]:
    """fd 2 without c10d's hostname warning while the block runs; whatever else was written is written after it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [x for x in held.read().splitlines(keepends=True) if HOSTNAME_WARNING not in x]
            if kept:
                os.write(2, b"".join(kept))
