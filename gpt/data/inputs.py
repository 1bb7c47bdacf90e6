"""The files a corpus is made of, and its documents streamed from them: text files (one document each), JSONL (a
named text field per line), Parquet (a named text column). Nothing here holds more than one read block or one
record batch of a file. Torch-free."""
from __future__ import annotations

import glob
import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt.config.data import DataConfig
from gpt.errors import UserError

SUFFIXES = {"text": (".txt", ".text", ".md"), "jsonl": (".jsonl", ".json", ".jsonl.gz"), "parquet": (".parquet",),
            "nanogpt": (".bin",), "llmc": (".bin",)}
READ_CHARS = 1 << 20  # a text file is read (and encoded) in chunks of about this many characters
MAX_CHUNK = 16  # ... and a chunk with no safe boundary is cut at this many READ_CHARS (memory stays bounded)
# Chunks end at a newline with non-space characters on both sides: byte-level BPE's pre-tokenizer always puts a
# boundary around such a newline, so encoding chunk by chunk gives exactly the tokens of encoding all at once.
_CHUNK_END = re.compile(r"(?<=\S)\n(?=\S)")


def input_files(spec: str, fmt: str, key: str = "data.text_path") -> list[Path]:
    """The files of `spec` (a file, a folder searched recursively for the format's suffixes, or a glob), sorted."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES[fmt]))
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"{key}={spec!r} names no {fmt} files (a file, a folder holding "
                        f"{'/'.join(SUFFIXES[fmt])} files, or a glob)")
    return files


def chunked(pieces: Iterator[str], size: int | None = None) -> Iterator[str]:
    """The text of `pieces` re-cut into chunks of at least `size` characters that end at a safe boundary."""
    size = size or READ_CHARS
    buf = ""
    for piece in pieces:
        buf += piece
        while len(buf) > size:
            end = _CHUNK_END.search(buf, size)
            cut = end.end() if end else (len(buf) if len(buf) >= MAX_CHUNK * size else 0)
            if not cut:
                break
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def text_pieces(path: Path, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Characters [start, stop) of a UTF-8 text file, read READ_CHARS at a time."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            pos = 0
            while stop is None or pos < stop:
                want = READ_CHARS if stop is None else min(READ_CHARS, stop - pos)
                piece = f.read(want)
                if not piece:
                    return
                lo = max(start - pos, 0)
                pos += len(piece)
                if lo < len(piece):
                    yield piece[lo:]
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def count_chars(path: Path) -> tuple[int, set[str]]:
    """The characters of a text file: how many, and which."""
    n, seen = 0, set()
    for piece in text_pieces(path):
        n += len(piece)
        seen.update(piece)
    return n, seen


def documents(path: Path, fmt: str, field: str) -> Iterator[Iterator[str]]:
    """The documents of one file, each as an iterator of its text's chunks."""
    if fmt == "text":
        yield chunked(text_pieces(path))
    elif fmt == "jsonl":
        yield from (iter((doc,)) for doc in _jsonl(path, field))
    elif fmt == "parquet":
        yield from (iter((doc,)) for doc in _parquet(path, field))
    else:
        raise ValueError(f"format {fmt} holds tokens, not documents")


def _jsonl(path: Path, field: str) -> Iterator[str]:
    with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)[field]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{n} is not a JSON object with a data.field={field!r} string") from None
            if not isinstance(doc, str):
                raise UserError(f"{path}:{n}: data.field={field!r} is {type(doc).__name__}, not a string")
            yield doc


def _parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # only for format=parquet: pyarrow is large

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise UserError(f"{path} has no column data.field={field!r}; its columns are "
                        f"{', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        yield from (doc for doc in batch.column(0).to_pylist() if doc is not None)


def corpus_files(cfg: DataConfig) -> list[Path]:
    """Every input file of an (absolute) data config, its sources' included; UserError when one names none."""
    specs = [(s.text_path, s.val_path, s.format) for s in cfg.sources] or [(cfg.text_path, cfg.val_path, cfg.format)]
    files = []
    for text_path, val_path, fmt in specs:
        files += input_files(text_path, fmt) + (input_files(val_path, fmt, "data.val_path") if val_path else [])
    return files


@dataclass(frozen=True)
class Corpus:
    """A run's corpus as its data section names it, listed once: its input files, and the folders prepared from them
    (each source's, or the data's own). What run.json records of it and what changed are gpt.data.content's."""
    files: list[Path]
    prepared: list[Path]


def corpus_of(cfg: DataConfig) -> Corpus | None:
    """The corpus of an (absolute) data config; None when an input names no files (planning then names it)."""
    prepared = [Path(s.dir) for s in cfg.sources] or [Path(cfg.dir)]
    try:
        return Corpus(corpus_files(cfg), prepared)
    except UserError:
        return None
