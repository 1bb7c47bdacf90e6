"""Turn a corpus into token shards: learn (or load) a tokenizer, split, tokenize in parallel, write shards and
meta.json. Pre-tokenized shards (nanoGPT's, llm.c's) are described in place instead.

    python -m gpt.data.prepare --text data/tinyshakespeare/input.txt --out data/shakespeare_char --tokenizer char
    python -m gpt.data.prepare --text 'owt/**/*.txt' --out data/owt --tokenizer hf --tokenizer-file gpt2.json

Layout of the output directory:
    meta.json                 tokenizer kind, vocab_size, dtype, per-split token counts and shards, the fingerprint
    inputs.json               each input file's path, size, mtime_ns and md5 as it was prepared (gpt.data.content)
    tokenizer.json            the tokenizer (see gpt.data.tokenizer)
    train_PPPPPP_KKKK.bin     raw little-endian uint16 tokens of part P (uint32 when the vocabulary needs it)
    part_PPPPPP.json          what part P wrote (gpt.data.parts)

One text file is one document split by characters, as in nanoGPT: its first (1 - val_fraction) trains. Several
files, JSONL or Parquet are documents, each followed by the end-of-text token; a document validates as a whole
(data.val_path, or val_fraction of the documents by a stable hash). The files are grouped into parts of about
PART_BYTES that worker processes tokenize, streaming: memory is bounded by the workers, never by the corpus. The
work is done under `.{out}.tmp-{fingerprint}` and renamed into place at the end; a run killed midway leaves that
folder, and the next run with the same inputs and settings keeps its finished parts; one with other inputs or
settings removes it once no live preparation owns it (gpt.data.temp_folders).

A prepared folder is never written again (`refuse_other`): runs read it, and a checkpoint records its fingerprint.
The fingerprint is of the inputs' content (Inputs): the inputs copied, moved or touched are still the same data.
"""
from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpt.config.data import (DEFAULT_SHARD_TOKENS, FORMATS, TOKEN_FORMATS, TOKENIZERS, check_inputs, check_settings,
                             vocab_to_learn)
from gpt.data import META_FILE, SPLITS
from gpt.data import pretokenized
from gpt.data.content import INPUTS_FILE, describe_change, file_rows, listing_md5, recorded_rows, remember
from gpt.data.inputs import count_chars, documents, input_files
from gpt.data.parts import Part, init_worker, read_record, run_part
from gpt.data.temp_folders import OWNER_FILE, claim, remove_stale, temp_folder
from gpt.data.tokenizer import TOKENIZER_FILE, BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from gpt.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
PART_BYTES = 16 << 20  # input bytes per unit of parallel, resumable work
POLL_S = 1.0  # how often a node of a preparation job looks for the tokenizer or another node's parts
BPE_SAMPLE_CHARS = 100 << 20  # a BPE tokenizer learns from the corpus's first this many characters
TINY_SHAKESPEARE_HINT = (
    "Tiny Shakespeare is data/tinyshakespeare/input.txt in the karpathy/char-rnn repository "
    "(https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt); "
    "`make data` copies it from ../shared/data when that folder is present")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


_SAID_PREPARED: set[tuple[Path, str]] = set()


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def prepare(text_path: str | Path, out_dir: str | Path, tokenizer: str = "char", vocab_size: int | None = None,
            val_fraction: float = 0.1, shard_tokens: int = DEFAULT_SHARD_TOKENS, *, fmt: str = "text",
            field: str = "text", val_path: str | Path | None = None, tokenizer_file: str | Path | None = None,
            workers: int = 1, node: int = 0, nodes: int = 1) -> Path:
    """Prepare `out_dir` from the inputs unless it already holds them prepared the same way. With several `nodes`
    (the tasks of a preparation job, each on its own node, all calling this): node 0 learns the tokenizer, every
    node tokenizes its share of the parts, and node 0 writes meta.json and moves the folder into place."""
    check_settings(tokenizer, vocab_size, val_fraction, shard_tokens)
    check_inputs(fmt, tokenizer, tokenizer_file and str(tokenizer_file), "data")
    out_dir, val_path = Path(out_dir), val_path and str(val_path)
    if fmt == "text" and not any(c in str(text_path) for c in "*?[") and not Path(text_path).exists():
        raise UserError(f"text file {text_path} not found. {TINY_SHAKESPEARE_HINT}")
    files = input_files(str(text_path), fmt)
    val_files = input_files(val_path, fmt, "data.val_path") if val_path else []
    inputs = Inputs(files, val_files, tokenizer_file, _settings(fmt, field, tokenizer, vocab_size, val_fraction,
                                                                shard_tokens))
    if _already_prepared(out_dir, inputs, text_path):
        return out_dir
    refuse_other(out_dir, inputs)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(out_dir, inputs.listing)  # its parts name their files by path: a moved corpus starts anew
    if node == 0:
        tmp.mkdir(exist_ok=True)  # a killed run's folder is kept: its finished parts are not done again
        remove_stale(out_dir, keep=tmp)
        claim(tmp)
    elif fmt in TOKEN_FORMATS or not _await_tokenizer(tmp, out_dir, inputs):
        return out_dir  # node 0 has nothing to share, or finished it all before this node started
    start = time.monotonic()
    source = {"path": str(Path(text_path).resolve()), "files": len(files) + len(val_files),
              "bytes": sum(f.stat().st_size for f in [*files, *val_files])}
    settings = inputs.settings
    # node 0 reads the content before it is tokenized (a file changed meanwhile is seen by the next planning)
    identity = {"fingerprint": inputs.fingerprint, "listing": inputs.listing, "settings": settings} if node == 0 else {}
    meta: dict[str, Any] = {**settings, **identity, "source": source}
    try:
        if fmt in TOKEN_FORMATS:
            meta.update(_describe_in_place(str(text_path), val_path, fmt, Path(tokenizer_file), tmp))
        else:
            described = _tokenize(files, val_files, settings, tokenizer_file, tmp, workers or default_workers(),
                                  (node, nodes))
            if described is None:  # another node writes meta.json
                return out_dir
            meta.update(described)
        _write_synced(tmp / INPUTS_FILE, json.dumps(inputs.rows).encode())
        _write_synced(tmp / META_FILE, json.dumps(meta, indent=2).encode())
    except UserError:  # inputs it cannot read: no part of its work is kept, for a run that fixes them has another
        shutil.rmtree(tmp, ignore_errors=True)  # listing (every node's preparation fails with the job)
        raise
    except FileNotFoundError:
        # Two preparations of the same inputs share one temp folder: the one that finished first moved it into
        # place under this one, and its data is this one's.
        if _is_prepared(out_dir, inputs):
            log.info("%s was prepared from the same inputs by another process meanwhile", out_dir)
            return out_dir
        raise
    (tmp / OWNER_FILE).unlink(missing_ok=True)  # a prepared folder has no owner
    _move_into_place(tmp, out_dir, inputs)
    log.info("prepared %s in %.1fs: vocab %d, %d train and %d val tokens", out_dir, time.monotonic() - start,
             meta["vocab_size"], meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"])
    return out_dir


def _already_prepared(out_dir: Path, inputs: Inputs, text_path: str | Path) -> bool:
    if not _is_prepared(out_dir, inputs):
        return False
    if (out_dir, inputs.listing) not in _SAID_PREPARED:  # a sweep plans every point against the same data: once
        _SAID_PREPARED.add((out_dir, inputs.listing))
        log.info("%s is already prepared from %s; nothing to do", out_dir, text_path)
    return True


def _settings(fmt: str, field: str, tokenizer: str, vocab_size: int | None, val_fraction: float,
              shard_tokens: int) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "input_format": fmt, "field": field, "tokenizer": tokenizer,
            "vocab_size": vocab_to_learn(tokenizer, vocab_size), "val_fraction": val_fraction,
            "shard_tokens": shard_tokens}


class Inputs:
    """A preparation's inputs and settings, and what identifies the data they give: the fingerprint, of each input
    file's name and content (and the tokenizer file's) and the settings. The listing (each file's path, size and
    mtime_ns, and the settings: what a folder prepared before content was recorded has as its fingerprint) saves
    reading the inputs while it is unchanged."""

    def __init__(self, files: list[Path], val_files: list[Path], tokenizer_file: str | Path | None,
                 settings: dict[str, Any]):
        self.splits = {"train": files, "val": val_files, "tokenizer": [Path(tokenizer_file)] if tokenizer_file else []}
        self.settings = settings

    @functools.cached_property
    def listing(self) -> str:
        return listing_md5([f for files in self.splits.values() for f in files], self.settings)

    @functools.cached_property
    def rows(self) -> dict[str, list[dict[str, Any]]]:
        return {split: file_rows(files) for split, files in self.splits.items()}

    @functools.cached_property
    def fingerprint(self) -> str:
        named = {split: [[Path(r["path"]).name, r["md5"]] for r in rows] for split, rows in self.rows.items()}
        text = json.dumps({**named, "settings": self.settings}, sort_keys=True).encode()
        return hashlib.md5(text, usedforsecurity=False).hexdigest()

    def prepared(self, out_dir: Path, meta: dict[str, Any]) -> bool:
        """Whether `meta` (out_dir's meta.json) is of these inputs: by the listing without reading them, else by their
        content. A folder prepared before content was recorded goes by its listing only."""
        if meta.get("listing", meta.get("fingerprint")) == self.listing:
            return True
        if "listing" not in meta:
            return False
        remember(recorded_rows(out_dir))
        return meta.get("fingerprint") == self.fingerprint

    def differences(self, out_dir: Path, meta: dict[str, Any]) -> str:
        """In words, how out_dir's inputs and settings differ from these."""
        # meta.json's own vocab_size is the tokenizer's; folders prepared before "settings" was recorded: the rest
        was = meta.get("settings") or {k: meta.get(k) for k in self.settings if k != "vocab_size"}
        said = [f"{k} was {was[k]!r}, now {v!r}" for k, v in self.settings.items() if k in was and was[k] != v]
        if "listing" not in meta:  # prepared by an earlier version
            said.append("it recorded its inputs' paths, sizes and modification times only (prepared by an earlier "
                        "version), and these differ now")
        else:
            changed = describe_change(recorded_rows(out_dir), [r for rows in self.rows.values() for r in rows])
            said += [changed] if changed else []
        return "; ".join(said) or f"fingerprint {meta.get('fingerprint')}, these give {self.fingerprint}"


def is_source_prepared(text_path: str | Path, out_dir: str | Path, tokenizer: str = "char",
                       vocab_size: int | None = None, val_fraction: float = 0.1,
                       shard_tokens: int = DEFAULT_SHARD_TOKENS, *, fmt: str = "text", field: str = "text",
                       val_path: str | Path | None = None, tokenizer_file: str | Path | None = None,
                       workers: int = 1) -> bool:
    """Whether prepare() with these arguments would have nothing to do (the inputs are read only if their listing
    changed since the folder was prepared)."""
    files = input_files(str(text_path), fmt)
    val_files = input_files(str(val_path), fmt, "data.val_path") if val_path else []
    settings = _settings(fmt, field, tokenizer, vocab_size, val_fraction, shard_tokens)
    return _is_prepared(Path(out_dir), Inputs(files, val_files, tokenizer_file, settings))


def _read_meta(out_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def _is_prepared(out_dir: Path, inputs: Inputs) -> bool:
    """True when meta.json is of these inputs, and every shard it lists is whole."""
    meta = _read_meta(out_dir)
    return meta is not None and _is_whole(out_dir, meta) and inputs.prepared(out_dir, meta)


def _is_whole(out_dir: Path, meta: dict[str, Any]) -> bool:
    """Every shard meta.json lists is whole, and the tokenizer is there."""
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        shards = [s for split in SPLITS for s in meta["splits"][split]["shards"]]
        return (out_dir / TOKENIZER_FILE).is_file() and all(
            (out_dir / s["file"]).stat().st_size == s.get("offset", 0) + s["tokens"] * itemsize for s in shards)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _describe_in_place(text_path: str, val_path: str | None, fmt: str, tokenizer_file: Path,
                       tmp: Path) -> dict[str, Any]:
    tok = BPETokenizer.from_file(tokenizer_file)
    splits = pretokenized.describe(text_path, val_path, fmt)
    pretokenized.check_tokens(splits, tok.vocab_size)
    tok.save(tmp)
    return {"vocab_size": tok.vocab_size, "dtype": "uint16", "splits": splits, "pad_vocab": True}


def _learn_tokenizer(files: list[Path], settings: dict[str, Any], tokenizer_file: str | Path | None,
                     one_document: bool) -> Tokenizer:
    kind, fmt, field = settings["tokenizer"], settings["input_format"], settings["field"]
    if kind == "hf":
        return BPETokenizer.from_file(tokenizer_file)
    log.info("learning a %s tokenizer from %d file(s)", kind, len(files))
    texts = (chunk for f in files for doc in documents(f, fmt, field) for chunk in doc)
    if kind == "char":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return CharTokenizer(sorted(seen), end_of_text=not one_document)
    sample, total = [], 0
    for text in texts:
        sample.append(text)
        total += len(text)
        if total >= BPE_SAMPLE_CHARS:
            break
    return BPETokenizer.train(sample, settings["vocab_size"])


def _plan_parts(files: list[Path], val_files: list[Path], settings: dict[str, Any]) -> list[Part]:
    """One text file: its train and val character ranges. Otherwise consecutive files of about PART_BYTES each."""
    fmt, field, vf = settings["input_format"], settings["field"], settings["val_fraction"]
    if fmt == "text" and len(files) == 1 and not val_files:
        n, _ = count_chars(files[0])
        split_at = int(n * (1 - vf))
        if not split_at or split_at == n:
            raise UserError(f"{files[0]} has {n} characters: too few to split with val_fraction={vf}")
        size = files[0].stat().st_size
        return [Part(0, (str(files[0]),), fmt, field, size, "train", (0, split_at)),
                Part(1, (str(files[0]),), fmt, field, 0, "val", (split_at, n))]
    parts: list[Part] = []
    for split, group in (("train" if val_files else None, files), ("val", val_files)):
        chunk: list[Path] = []
        size = 0
        for i, f in enumerate(group):
            chunk.append(f)
            size += f.stat().st_size
            if size >= PART_BYTES or i == len(group) - 1:
                parts.append(Part(len(parts), tuple(map(str, chunk)), fmt, field, size, split, None,
                                  0.0 if split else vf))
                chunk, size = [], 0
    return parts


def _await_tokenizer(tmp: Path, out_dir: Path, inputs: Inputs) -> bool:
    """A node other than 0: wait for node 0's tokenizer in tmp (True), or for out_dir prepared without this node
    (False: node 0 had every part and finished first). Never creates tmp: node 0 may have renamed it already."""
    while not (tmp / TOKENIZER_FILE).is_file():
        if _is_prepared(out_dir, inputs):
            return False
        time.sleep(POLL_S)
    return True


def _shared_tokenizer(files: list[Path], settings: dict[str, Any], tokenizer_file: str | Path | None, tmp: Path,
                      one_document: bool) -> Tokenizer:
    """The tokenizer in tmp (a resumed run's: the one its finished parts used, or node 0's for the other nodes),
    else learnt here. Written under another name and renamed: a reader never sees half of it."""
    if not (tmp / TOKENIZER_FILE).is_file():
        staging = tmp / ".tokenizer"
        _learn_tokenizer(files, settings, tokenizer_file, one_document).save(staging)
        os.replace(staging / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        staging.rmdir()
    return load_tokenizer(tmp)


def _tokenize(files: list[Path], val_files: list[Path], settings: dict[str, Any],
              tokenizer_file: str | Path | None, tmp: Path, workers: int,
              share: tuple[int, int] = (0, 1)) -> dict[str, Any] | None:
    """Tokenize this node's share of the parts (node, nodes); node 0 then waits for every part and returns what
    meta.json says of them, the other nodes None."""
    node, nodes = share
    parts = _plan_parts(files, val_files, settings)
    tok = _shared_tokenizer(files + val_files, settings, tokenizer_file, tmp, parts[0].char_range is not None)
    dtype = token_dtype(tok.vocab_size)
    records = {p.index: r for p in parts if (r := read_record(tmp, p, dtype.itemsize)) is not None}
    todo = [p for p in parts if p.index not in records and p.index % nodes == node]
    if records:
        log.info("resuming: %d of %d parts were already done", len(records), len(parts))
    with tqdm(total=sum(p.bytes for p in parts), initial=sum(p.bytes for p in parts if p.index in records),
              unit="B", unit_scale=True, desc="tokenizing", delay=2.0) as bar:
        tokens = 0
        for record in _run_parts(todo, tmp, dtype, settings["shard_tokens"], workers):
            records[record["part"]["index"]] = record
            tokens += sum(s["tokens"] for s in record["splits"].values())
            bar.update(record["part"]["bytes"])
            bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
    if node:
        return None
    for p in parts:  # the other nodes' parts
        while p.index not in records:
            if (record := read_record(tmp, p, dtype.itemsize)) is not None:
                records[p.index] = record
            else:
                time.sleep(POLL_S)
    splits = {}
    for split in SPLITS:
        shards = list(itertools.chain.from_iterable(records[p.index]["splits"][split]["shards"] for p in parts))
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "shards": shards}
        if not splits[split]["tokens"]:
            raise UserError(f"the {split} split of {files[0].parent} is empty: too few documents for "
                            f"val_fraction={settings['val_fraction']}; give data.val_path or more documents")
    return {"vocab_size": tok.vocab_size, "requested_vocab_size": settings["vocab_size"], "dtype": dtype.name,
            "splits": splits, "end_of_text": tok.eot, "pad_vocab": settings["tokenizer"] == "hf"}


def _run_parts(todo: list[Part], tmp: Path, dtype: np.dtype, shard_tokens: int, workers: int):
    """The parts' records as they finish: in this process for one worker, or for less than one part's worth of
    input (a pool's interpreters would cost more than they save), else in a pool of `workers`."""
    args = (str(tmp), dtype.name, shard_tokens)
    if workers <= 1 or len(todo) <= 1 or sum(p.bytes for p in todo) <= PART_BYTES:
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        init_worker(*args)  # one core, as each worker of a pool: `workers` says how many cores are used
        try:
            yield from map(run_part, todo)
        finally:
            if saved is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads (tokenizers, torch)
    with ctx.Pool(min(workers, len(todo)), initializer=init_worker, initargs=args) as pool:
        yield from pool.imap_unordered(run_part, todo)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def refuse_other(out_dir: Path, inputs: Inputs) -> None:
    """Refuse to prepare into a folder that holds anything but this preparation's data, saying how it differs.

    Preparing again in place would change the tokens under the runs that read the folder: a running rank maps its
    shards as it reads them, and a requeued or queued job opens them again later, on any node. Switching to a new
    version atomically would leave the old version in use for as long as any run or checkpoint refers to it,
    which no preparation can know: it could never be removed safely. So a prepared folder is one data, for good;
    other data goes into another folder."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    meta = _read_meta(out_dir)
    if meta is None or "fingerprint" not in meta:
        raise UserError(f"{out_dir} exists and is not a prepared data directory; "
                        f"choose another output directory or empty it")
    if not inputs.prepared(out_dir, meta):
        what = f"holds data prepared from other inputs or settings ({inputs.differences(out_dir, meta)})"
    elif not _is_whole(out_dir, meta):
        what = "is incomplete (a shard is missing or truncated)"
    else:
        return  # another node or process moved this very preparation into place since the caller looked
    raise UserError(f"{out_dir} {what}; runs may read it, so it is never prepared again in place: prepare into "
                    f"another directory (data.dir), or delete {out_dir} once no run reads it")


def _move_into_place(tmp: Path, out_dir: Path, inputs: Inputs) -> None:
    """Rename tmp to out_dir, which must not exist or be empty: the rename itself refuses a folder another
    preparation filled meanwhile (ENOTEMPTY, EEXIST), so of two at once exactly one lands."""
    try:
        os.rename(tmp, out_dir)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_prepared(out_dir, inputs):  # the same inputs prepared by another process: nothing lost
            refuse_other(out_dir, inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, help="the inputs: a file, a folder or a glob")
    parser.add_argument("--out", required=True, help="output directory for shards, meta.json and tokenizer")
    parser.add_argument("--format", choices=FORMATS, default="text")
    parser.add_argument("--field", default="text", help="jsonl: the text field; parquet: the text column")
    parser.add_argument("--val", default=None, help="validation inputs (default: val-fraction of the documents)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="char")
    parser.add_argument("--tokenizer-file", default=None, help="hf only: a Hugging Face tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=None, help="BPE only: how many tokens to learn")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction held out for validation")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    parser.add_argument("--workers", type=int, default=0, help="processes (0: one per core)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepare(args.text, args.out, args.tokenizer, args.vocab_size, args.val_fraction, args.shard_tokens,
                fmt=args.format, field=args.field, val_path=args.val, tokenizer_file=args.tokenizer_file,
                workers=args.workers)
    except UserError as e:
        print(f"error: {as_flags(str(e))}", file=sys.stderr)
        return 2
    return 0


FLAGS = {"data.text_path": "--text", "data.val_path": "--val", "data.dir": "--out", "data.format": "--format",
         "data.field": "--field", "data.tokenizer": "--tokenizer", "data.tokenizer_file": "--tokenizer-file",
         "data.vocab_size": "--vocab-size", "data.val_fraction": "--val-fraction", "val_fraction": "--val-fraction",
         "data.shard_tokens": "--shard-tokens"}


def as_flags(message: str) -> str:
    """A refusal worded for `python -m launch` (data.field='body'), in this command's flags (--field 'body')."""
    def flag(m: re.Match) -> str:
        key, value = m.group(1), m.group(2)
        return FLAGS[key] + (" " if value else "") if key in FLAGS else m.group(0)

    return re.sub(r"\b((?:data\.)?[a-z_]+)(=?)", flag, message)


if __name__ == "__main__":
    sys.exit(main())
