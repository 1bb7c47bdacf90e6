"""A save that storage refused (a full disk, a quota, a read-only folder), said in one line: the folder, why, and
for a full disk the space a checkpoint needs and what is free. Torch-free: DCP's gathered exception is unpacked by
duck typing (its `failures` maps each failing rank to its exception and traceback)."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from gpt.checkpoint.store import META
from gpt.errors import UserError
from gpt.resilience.disk_faults import cause

SPACE = (errno.ENOSPC, errno.EDQUOT)


class SaveFailed(UserError):
    """A checkpoint that could not be written: its partial folder is removed and the previous checkpoint is
    untouched (the message says so)."""


# torch's zip writer reports a failed write without its OSError ("unexpected pos 704 vs 598")
LOST_ERRNO = ("PytorchStreamWriter failed writing", "unexpected pos")
NEARLY_FULL = 16 * 2**20  # less free than this after a write failed: the disk filled up


def storage_error(e: BaseException, folder: Path) -> OSError | None:
    """The OSError behind a failed write into `folder`: `e`, its cause or context, or a rank's failure inside DCP's
    exception. A write whose errno torch's writer lost counts as a full disk when `folder` has almost no room
    left, else as an I/O error."""
    stack: list[BaseException | None] = [e]
    seen: set[int] = set()
    lost = False
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        lost = lost or any(sign in str(x) for sign in LOST_ERRNO)
        stack += [x.__cause__, x.__context__]
        stack += [failure[0] for failure in getattr(x, "failures", {}).values()]
    if not lost:
        return None
    try:
        full = shutil.disk_usage(folder).free < NEARLY_FULL
    except OSError:
        full = False
    return OSError(errno.ENOSPC if full else errno.EIO, "a write failed", None)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 once it is gone: a prune or a cleanup may race with this)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:
            pass
    return total


def checkpoint_bytes(folder: Path) -> int | None:
    """A whole checkpoint's size, from its manifest."""
    try:
        return sum(json.loads((folder / META).read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def failure_line(tmp: Path, e: OSError | None, written: int, previous: Path | None, keep: int) -> str:
    """The one line a failed save reports, after its partial folder `tmp` (`written` bytes) was removed."""
    if e is None:
        return f"cannot write checkpoint {tmp}: another rank's write failed (its log says why)"
    code = getattr(e, "errno", None)
    line = f"cannot write checkpoint {tmp}: {cause(e)}"
    if getattr(e, "filename", None) and Path(e.filename) != tmp:
        line += f" ({e.filename})"
    if code in SPACE:
        needed = checkpoint_bytes(previous) if previous is not None else None
        need = f"about {mib(needed)}" if needed else f"more than the {mib(written)} written before it failed"
        line += (f"; a checkpoint needs {need} and {mib(shutil.disk_usage(tmp.parent).free)} is free on "
                 f"{tmp.parent}; the partial save was removed")
        if previous is not None:
            line += f" and {previous.name} is kept"
        return line + (f". Free space there, lower checkpoint.keep (now {keep}), or point hydra.run.dir at a folder "
                       "with room")
    return line + "; point hydra.run.dir at a writable folder with room for the checkpoints"
