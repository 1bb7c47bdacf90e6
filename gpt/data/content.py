"""What identifies a corpus: the content of its files, so that a corpus copied without `cp -p`, synced without
`rsync -t`, touched or moved, its content unchanged, is the same corpus. Each file's path, size and mtime_ns (its
listing) is only a cache key: while it is unchanged nothing is read, and when it changed only the files whose key
changed are read again. Torch-free."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INPUTS_FILE = "inputs.json"  # in a prepared folder: the rows (file_rows) of the inputs it was prepared from
# (resolved path, size, mtime_ns) -> md5 of the file's content: this process's, and what records read here gave
_DIGESTS: dict[tuple[str, int, int], str] = {}
LOUD_BYTES = 1 << 30  # reading this much to compare content is said, once per call: it takes a while
SHOWN_FILES = 3  # a refusal names at most this many files of each kind


def listing_md5(files: list[Path], extra: Any = None) -> str:
    """What identifies the inputs without reading them: each file's path, size and modification time."""
    h = hashlib.md5(usedforsecurity=False)
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def file_rows(files: list[Path]) -> list[dict[str, Any]]:
    """Each file's path, size, mtime_ns and md5, its content read only when its key is not known (remember)."""
    keys = []
    for f in files:
        st = f.stat()
        keys.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    todo = [k for k in keys if k not in _DIGESTS]
    if sum(k[1] for k in todo) >= LOUD_BYTES:
        log.info("reading %d file(s) (%.1f GB) whose path, size or time changed, to compare their content", len(todo),
                 sum(k[1] for k in todo) / 1e9)
    for key in todo:
        _DIGESTS[key] = _md5(Path(key[0]))
    return [{"path": p, "size": s, "mtime_ns": t, "md5": _DIGESTS[(p, s, t)]} for p, s, t in keys]


def remember(rows: list[dict[str, Any]]) -> None:
    """Take recorded rows (file_rows') as known: their files are not read again while their keys hold."""
    for r in rows:
        _DIGESTS[(r["path"], r["size"], r["mtime_ns"])] = r["md5"]


def _is_row(r: Any) -> bool:
    types = {"path": str, "size": int, "mtime_ns": int, "md5": str}
    return isinstance(r, dict) and all(isinstance(r.get(k), t) for k, t in types.items())


def recorded_rows(out_dir: Path, splits: tuple[str, ...] = ("train", "val", "tokenizer")) -> list[dict[str, Any]]:
    """The rows of the input files a folder was prepared from (its inputs.json: the corpus's train and val files,
    and the tokenizer file); [] when it has none to read. A file a user may edit is read defensively: a row that is
    not one is left out (its file is then read again, and named as added)."""
    try:
        rows = json.loads((out_dir / INPUTS_FILE).read_text(encoding="utf-8"))
        return [r for split in splits for r in rows.get(split, []) if _is_row(r)]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def content_md5(rows: list[dict[str, Any]]) -> str:
    """One file: the md5 of its content (as run.json has always recorded it). Several: of each one's name and md5,
    in order (a document's split depends on its file's name: gpt.data.parts.is_val), not of where they lie."""
    if len(rows) == 1:
        return rows[0]["md5"]
    h = hashlib.md5(usedforsecurity=False)
    for r in rows:
        h.update(f"{Path(r['path']).name}\0{r['md5']}\n".encode())
    return h.hexdigest()


def corpus_record(files: list[Path], known: dict[str, Any] | None = None, prepared: list[Path] = ()
                  ) -> dict[str, Any]:
    """What run.json records of a run's corpus: where it lies, its size, newest modification time, listing and
    content md5 (content_md5). The content is read only when the listing differs from `known`'s (a copy, a touch,
    a move: its md5 then says whether the content changed too), and then only of the files whose rows the
    `prepared` folders (prepared_rows) do not know."""
    stats = [f.stat() for f in files]
    record = {"path": os.path.commonpath([str(f.resolve()) for f in files]), "size": sum(s.st_size for s in stats),
              "mtime": max(s.st_mtime for s in stats), "listing": listing_md5(files)}
    if known and known.get("listing") == record["listing"] and known.get("md5"):
        return {**record, "md5": known["md5"]}
    remember(prepared_rows(prepared))
    return {**record, "md5": content_md5(file_rows(files))}


def prepared_rows(prepared: list[Path]) -> list[dict[str, Any]]:
    """The rows of the train and val files the `prepared` folders were made from, in order."""
    return [r for d in prepared for r in recorded_rows(d, ("train", "val"))]


def corpus_change(files: list[Path], prepared: list[Path], known: dict[str, Any] | None,
                  corpus: dict[str, Any]) -> str:
    """data.text_md5's line of a refusal: which of the corpus's `files` changed since run.json's `known` record and
    how, in words (corpus_record's `corpus` as it is now), and the remedies that hold (a prepared folder is never
    prepared again: a run on the changed corpus needs a folder of its own)."""
    now = file_rows(files)  # read already, by corpus_record
    before = rows_before(prepared_rows(prepared), now, known)
    what = describe_change(before, now) if before else ""
    if not what and known:
        what = (f"the corpus changed ({known.get('size', 0):,} -> {corpus['size']:,} bytes in {len(files)} file(s), "
                f"newest modified {_when_s(known.get('mtime'))} -> {_when_s(corpus['mtime'])})")
    return (f"data.text_md5: {what or 'the corpus changed'} since the run trained on it. Restore its content to "
            "continue this run, or train on this corpus as a new run (run=NAME) with a data.dir of its own")


def rows_before(prepared: list[dict[str, Any]], now: list[dict[str, Any]], known: dict[str, Any] | None
                ) -> list[dict[str, Any]]:
    """The corpus's files as the run trained on them: as its `prepared` folders' rows when they hold the run's
    corpus, else for one file as run.json recorded it; [] when neither tells."""
    if known and prepared and content_md5(prepared) == known.get("md5"):
        return prepared
    if known and len(now) == 1 and "mtime" in known and "size" in known:
        return [{"path": known.get("path", now[0]["path"]), "size": known["size"], "md5": known.get("md5"),
                 "mtime_ns": int(known["mtime"] * 1e9)}]
    return []


def _when_s(mtime: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime)) if mtime else "?"


def _when(mtime_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime_ns / 1e9))


def how_changed(before: dict[str, Any], now: dict[str, Any]) -> str:
    """'1,115,394 -> 1,115,401 bytes, modified 2024-05-01 10:00:00 -> 2024-06-02 11:30:12' of two rows of a file."""
    size = (f"{before['size']:,} -> {now['size']:,} bytes" if before["size"] != now["size"]
            else f"the same size ({now['size']:,} bytes)")
    was, is_now = _when(before["mtime_ns"]), _when(now["mtime_ns"])
    return f"{size}, modified {was} -> {is_now}" if was != is_now else f"{size}, modified at {is_now}"


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows by their path below the folder their files share (one file: its name): a moved corpus keeps them."""
    paths = [r["path"] for r in rows]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    return {os.path.relpath(r["path"], root): r for r in rows}


def _some(paths: list[str]) -> str:
    more = f" and {len(paths) - SHOWN_FILES} more" if len(paths) > SHOWN_FILES else ""
    return ", ".join(paths[:SHOWN_FILES]) + more


def describe_change(before: list[dict[str, Any]], now: list[dict[str, Any]]) -> str:
    """In words, which files' content differs between two sets of rows and how (size, time), and which were added
    or removed; '' when each file holds what it held (an order that changed)."""
    if len(before) == len(now) == 1:  # one file, wherever it lies now
        was, new_path = before[0]["path"], now[0]["path"]
        moved = f" (before: {was})" if was != new_path else ""
        return "" if before[0]["md5"] == now[0]["md5"] else (
            f"{new_path}{moved} changed ({how_changed(before[0], now[0])})")
    old, new = _by_name(before), _by_name(now)
    changed = [f"{new[n]['path']} changed ({how_changed(old[n], new[n])})" for n in new
               if n in old and old[n]["md5"] != new[n]["md5"]]
    added = [new[n]["path"] for n in new if n not in old]
    removed = [old[n]["path"] for n in old if n not in new]
    said = [_some(changed)] if changed else []
    said += [f"added: {_some(added)}"] if added else []
    said += [f"removed: {_some(removed)}"] if removed else []
    return "; ".join(said)
