"""Making a checkpoint's files durable before it is renamed into place or an older one is pruned: a rename is only
as durable as the data it names and the folder entry it changes, so the files, then their folders, are fsynced.
Torch-free."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path, files: bool = True) -> None:
    """Every file under `folder` (unless `files` is False: their writers synced them, and an open and fsync per file
    from one process is a metadata operation per file on a shared file system), then every folder from the deepest
    up to `folder` itself (the entries the files' creates and renames made)."""
    folders = []
    for top, _, names in os.walk(folder):
        folders.append(Path(top))
        for name in names if files else ():
            if (path := Path(top) / name).is_file():
                fsync_path(path)
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)


def write_durably(path: Path, text: str) -> None:
    """`text` into `path`, on stable storage before this returns (the folder entry is the caller's to sync)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
