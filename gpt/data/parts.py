"""One unit of preparation work (a part: consecutive input files, or a character range of one text file) and the
worker that tokenizes it into its own shards. A part is written whole, then its record (part_NNNNNN.json) is
renamed into place: a preparation killed midway keeps every recorded part and redoes the rest, byte for byte.
Torch-free."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt.data.inputs import chunked, documents, text_pieces
from gpt.data.tokenizer import Tokenizer, load_tokenizer
from gpt.errors import UserError

BATCH_CHARS = 1 << 20  # documents are encoded in batches of about this many characters


@dataclass(frozen=True)
class Part:
    index: int
    files: tuple[str, ...]
    fmt: str
    field: str
    bytes: int
    split: str | None = None  # train or val for every document; None: val_fraction of the documents, by hash
    char_range: tuple[int, int] | None = None  # one text file's characters [start, stop), with no end-of-text
    val_fraction: float = 0.0

    @property
    def record(self) -> str:
        return f"part_{self.index:06d}.json"


def is_val(name: str, doc: int, val_fraction: float) -> bool:
    """Whether document `doc` of file `name` validates: a stable hash, so every run and worker agrees."""
    h = hashlib.blake2b(f"{name}\0{doc}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < val_fraction * 2 ** 64


def _pieces(part: Part) -> Iterator[tuple[str, str, bool]]:
    """(split, text, ends a document) for every chunk of the part's documents."""
    if part.char_range is not None:
        for chunk in chunked(text_pieces(Path(part.files[0]), *part.char_range)):
            yield part.split, chunk, False
        return
    for file in part.files:
        name = Path(file).name
        for n, doc in enumerate(documents(Path(file), part.fmt, part.field)):
            split = part.split or ("val" if is_val(name, n, part.val_fraction) else "train")
            prev = None
            for chunk in doc:
                if prev is not None:
                    yield split, prev, False
                prev = chunk
            yield split, prev or "", True


class ShardWriter:
    """Tokens of one split of one part, appended to shards `{split}_{part}_{k}.bin` of at most shard_tokens."""

    def __init__(self, out: Path, split: str, part: int, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.part, self.dtype, self.limit = out, split, part, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.f = None

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self.f is None or self.shards[-1]["tokens"] == self.limit:
                self._next()
            take = ids[:self.limit - self.shards[-1]["tokens"]]
            self.f.write(take.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            self.shards[-1]["tokens"] += take.size
            ids = ids[take.size:]

    def _next(self) -> None:
        self.close()
        self.shards.append({"file": f"{self.split}_{self.part:06d}_{len(self.shards):04d}.bin", "tokens": 0})
        self.f = open(self.out / self.shards[-1]["file"], "wb")

    def close(self) -> None:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            self.f = None


def tokenize_part(part: Part, out: Path, tok: Tokenizer, dtype: np.dtype, shard_tokens: int) -> dict[str, Any]:
    """Write the part's shards and its record; returns the record."""
    writers = {s: ShardWriter(out, s, part.index, dtype, shard_tokens) for s in ("train", "val")}
    counts = {"train": 0, "val": 0}
    batch: list[tuple[str, str, bool]] = []
    size = 0

    def flush() -> None:
        for (split, _, ends), ids in zip(batch, tok.encode_batch([text for _, text, _ in batch]), strict=True):
            if ends and tok.eot is not None:
                ids = [*ids, tok.eot]
            writers[split].write(np.asarray(ids, dtype=dtype))
            counts[split] += len(ids)
        batch.clear()

    try:
        for piece in _pieces(part):
            batch.append(piece)
            size += len(piece[1])
            if size >= BATCH_CHARS:
                flush()
                size = 0
        flush()
    finally:
        for w in writers.values():
            w.close()
    record = {"part": asdict(part), "splits": {s: {"tokens": counts[s], "shards": w.shards}
                                              for s, w in writers.items()}}
    tmp = out / f".{part.record}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, out / part.record)
    return record


def read_record(out: Path, part: Part, itemsize: int) -> dict[str, Any] | None:
    """The part's record when it is this part's and every shard it lists is whole; else None (to redo)."""
    try:
        record = json.loads((out / part.record).read_text())
        if record["part"] != json.loads(json.dumps(asdict(part))):
            return None
        for split in record["splits"].values():
            for s in split["shards"]:
                if (out / s["file"]).stat().st_size != s["tokens"] * itemsize:
                    return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


_worker: dict[str, Any] = {}


def init_worker(out: str, dtype: str, shard_tokens: int) -> None:
    """Pool initializer: the settings only, and the tokenizer's own threads off (the processes are the parallelism).
    It must not fail: a pool replaces a worker whose initializer raised, forever, so the launcher would hang."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.clear()
    _worker.update(out=Path(out), dtype=np.dtype(dtype), shard_tokens=shard_tokens)


def run_part(part: Part) -> dict[str, Any]:
    w = _worker
    if "tok" not in w:  # one tokenizer per process, loaded by its first part
        try:
            w["tok"] = load_tokenizer(w["out"])
        except UserError:
            if not w["out"].is_dir():  # another preparation of the same inputs finished and moved it into place
                raise FileNotFoundError(w["out"]) from None
            raise
    return tokenize_part(part, w["out"], w["tok"], w["dtype"], w["shard_tokens"])
