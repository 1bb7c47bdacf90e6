"""Turn a text file into token shards: train a tokenizer, split, tokenize, write shards and meta.json.

    python -m gpt.data.prepare --text data/tinyshakespeare/input.txt --out data/shakespeare_char --tokenizer char

Layout of the output directory:
    meta.json           tokenizer kind, vocab_size, dtype, per-split token counts and shards, source path/size/md5
    tokenizer.json      the trained tokenizer (see gpt.data.tokenizer)
    train_000000.bin    raw little-endian uint16 tokens (uint32 when the vocabulary does not fit 16 bits)
    val_000000.bin      ...

The split is by characters, as in nanoGPT: the first (1 - val_fraction) of the text trains, the rest validates.
The directory is built under a temporary name and renamed into place, so a crash never leaves a directory
with a meta.json that describes missing or partial shards.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from gpt.data import DEFAULT_SHARD_TOKENS, META_FILE, SPLITS, TOKENIZERS, check_settings
from gpt.data.tokenizer import TOKENIZER_FILE, BPETokenizer, CharTokenizer, Tokenizer
from gpt.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 20  # text is encoded in chunks of about this many characters (progress, memory)
# Chunks end at a newline with non-space characters on both sides: byte-level BPE's pre-tokenizer always puts a
# boundary around such a newline, so encoding chunk by chunk gives exactly the tokens of encoding all at once.
_CHUNK_END = re.compile(r"(?<=\S)\n(?=\S)")
TINY_SHAKESPEARE_HINT = (
    "Tiny Shakespeare is data/tinyshakespeare/input.txt in the karpathy/char-rnn repository "
    "(https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt); "
    "`make data` copies it from ../shared/data when that folder is present")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare(text_path: str | Path, out_dir: str | Path, tokenizer: str = "char", vocab_size: int | None = None,
            val_fraction: float = 0.1, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Path:
    """Prepare `out_dir` from `text_path` unless it already holds the same source prepared the same way."""
    check_settings(tokenizer, vocab_size, val_fraction, shard_tokens)
    text_path, out_dir = Path(text_path), Path(out_dir)
    if not text_path.is_file():
        raise UserError(f"text file {text_path} not found. {TINY_SHAKESPEARE_HINT}")
    source = {"path": str(text_path.resolve()), "size": text_path.stat().st_size, "md5": _md5(text_path)}
    settings = {"format": FORMAT_VERSION, "tokenizer": tokenizer, "vocab_size": vocab_size,
                "val_fraction": val_fraction, "shard_tokens": shard_tokens}
    if _is_prepared(out_dir, source, settings):
        log.info("%s is already prepared from %s; nothing to do", out_dir, text_path)
        return out_dir
    if out_dir.exists() and not (out_dir.is_dir() and ((out_dir / META_FILE).is_file() or not any(out_dir.iterdir()))):
        raise UserError(f"{out_dir} exists and is not a prepared data directory; "
                        f"choose another output directory or empty it")

    start = time.monotonic()
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{text_path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    split_at = int(len(text) * (1 - val_fraction))
    texts = {"train": text[:split_at], "val": text[split_at:]}
    if not texts["train"] or not texts["val"]:
        raise UserError(f"{text_path} has {len(text)} characters: too few to split with val_fraction={val_fraction}")

    log.info("training a %s tokenizer on %s (%d characters)", tokenizer, text_path, len(text))
    tok: Tokenizer = CharTokenizer.train(text) if tokenizer == "char" else BPETokenizer.train(text, vocab_size)
    dtype = token_dtype(tok.vocab_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        splits = {}
        with tqdm(total=len(text), unit="char", unit_scale=True, desc=f"tokenizing {text_path.name}",
                  delay=2.0) as bar:
            for split in SPLITS:
                splits[split] = _write_split(tok, texts[split], split, tmp, dtype, shard_tokens, bar)
        tok.save(tmp)
        meta = {**settings, "vocab_size": tok.vocab_size, "requested_vocab_size": vocab_size,
                "dtype": dtype.name, "splits": splits, "source": source}
        _write_synced(tmp / META_FILE, json.dumps(meta, indent=2).encode())
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s in %.1fs: vocab %d, %d train and %d val tokens", out_dir, time.monotonic() - start,
             tok.vocab_size, splits["train"]["tokens"], splits["val"]["tokens"])
    return out_dir


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _is_prepared(out_dir: Path, source: dict[str, Any], settings: dict[str, Any]) -> bool:
    """True when meta.json records this source and these settings, and every shard it lists is whole."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
        if meta["source"]["md5"] != source["md5"] or meta["requested_vocab_size"] != settings["vocab_size"]:
            return False
        if any(meta[k] != v for k, v in settings.items() if k != "vocab_size"):
            return False
        itemsize = np.dtype(meta["dtype"]).itemsize
        shards = [s for split in SPLITS for s in meta["splits"][split]["shards"]]
        return (out_dir / TOKENIZER_FILE).is_file() and all(
            (out_dir / s["file"]).stat().st_size == s["tokens"] * itemsize for s in shards)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _chunks(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = _CHUNK_END.search(text, start + CHUNK_CHARS) if start + CHUNK_CHARS < len(text) else None
        stop = end.end() if end else len(text)
        yield text[start:stop]
        start = stop


def _write_split(tok: Tokenizer, text: str, split: str, out: Path, dtype: np.dtype, shard_tokens: int,
                 bar: tqdm) -> dict[str, Any]:
    """Encode `text` chunk by chunk into shards `{split}_000000.bin`, ... of at most shard_tokens tokens each."""
    shards: list[dict[str, Any]] = []
    f = None
    try:
        for chunk in _chunks(text):
            ids = np.asarray(tok.encode(chunk), dtype=dtype)
            while ids.size:
                if f is None or shards[-1]["tokens"] == shard_tokens:
                    if f is not None:
                        _close_synced(f)
                    shards.append({"file": f"{split}_{len(shards):06d}.bin", "tokens": 0})
                    f = open(out / shards[-1]["file"], "wb")
                take = ids[:shard_tokens - shards[-1]["tokens"]]
                f.write(take.astype(dtype.newbyteorder("<"), copy=False).tobytes())
                shards[-1]["tokens"] += take.size
                ids = ids[take.size:]
            bar.update(len(chunk))
    finally:
        if f is not None:
            _close_synced(f)
    return {"chars": len(text), "tokens": sum(s["tokens"] for s in shards), "shards": shards}


def _close_synced(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move tmp to out_dir; an older prepared out_dir is moved aside first and deleted afterwards."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, help="UTF-8 text file to tokenize")
    parser.add_argument("--out", required=True, help="output directory for shards, meta.json and tokenizer")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="char")
    parser.add_argument("--vocab-size", type=int, default=None, help="BPE only: how many tokens to learn")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of characters for validation")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepare(args.text, args.out, args.tokenizer, args.vocab_size, args.val_fraction, args.shard_tokens)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
