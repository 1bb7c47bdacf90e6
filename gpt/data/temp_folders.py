"""The `.DIR.tmp-FINGERPRINT` folders a preparation works in: who owns one (host and pid, in OWNER_FILE), and
removing those that killed preparations with other inputs or settings left behind. Torch-free."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import time
from pathlib import Path

from gpt.errors import UserError

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
# A folder on another host (whose pid cannot be checked from here) is stale when nothing in it changed for this
# long: a live preparation writes a part every minute or so, and learning a BPE tokenizer takes minutes, not hours.
STALE_AGE_S = 6 * 3600


def temp_folder(out_dir: Path, fingerprint: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.tmp-{fingerprint[:12]}"


def claim(tmp: Path) -> None:
    """Record this process as the folder's owner (a resumed folder changes hands). Only a folder of this user's is
    resumed: in a data folder others can write in, another user's (or a link they put there) would let them choose
    the parts this preparation publishes, and it would write where they point."""
    tmp.mkdir(exist_ok=True)
    st = os.lstat(tmp)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        what = "a link" if stat.S_ISLNK(st.st_mode) else f"uid {st.st_uid}'s"
        raise UserError(f"{tmp} is {what}, not a folder of uid {os.getuid()}'s: another user prepares the same data "
                        f"there; use their {tmp.name.split('.tmp-')[0].lstrip('.')} once it is ready, or set data.dir "
                        "to a folder of your own")
    part = tmp / f".{OWNER_FILE}.{socket.gethostname()}.{os.getpid()}"
    part.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    os.replace(part, tmp / OWNER_FILE)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _newest_change(folder: Path) -> float:
    return max([folder.stat().st_mtime, *(e.stat().st_mtime for e in os.scandir(folder))])


def is_stale(tmp: Path, now: float | None = None) -> bool:
    """Owned by a dead process of this host, or (another host's, or no owner recorded) unchanged for STALE_AGE_S."""
    try:
        owner = json.loads((tmp / OWNER_FILE).read_text())
        if owner["host"] == socket.gethostname():
            return not _pid_alive(int(owner["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return (now or time.time()) - _newest_change(tmp) > STALE_AGE_S
    except OSError:  # removed meanwhile
        return False


def remove_stale(out_dir: Path, keep: Path) -> list[Path]:
    """Remove out_dir's other temp folders that no live preparation owns; returns them."""
    removed = []
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        if tmp != keep and tmp.is_dir() and is_stale(tmp):
            log.info("removing %s: the work of a preparation that stopped midway, with other inputs or settings", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed
