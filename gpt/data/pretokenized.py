"""Token shards someone else prepared, described in place (never copied): nanoGPT's flat little-endian uint16
`train.bin`/`val.bin`, and llm.c's shards (a header of 256 little-endian int32: magic 20240520, version 1, the token
count; then the uint16 tokens). Torch-free."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gpt.data.inputs import input_files
from gpt.errors import UserError

LLMC_MAGIC, LLMC_VERSION = 20240520, 1
LLMC_HEADER_INTS = 256
LLMC_HEADER_BYTES = LLMC_HEADER_INTS * 4


def write_llmc(path: str | Path, tokens: np.ndarray) -> None:
    """An llm.c shard of `tokens` (uint16), as llm.c's dev/data scripts write it."""
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:3] = LLMC_MAGIC, LLMC_VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def shard_entry(path: Path, fmt: str) -> dict[str, Any]:
    """meta.json's description of one shard: its absolute path, token count, and where its tokens start."""
    size = path.stat().st_size
    if fmt == "nanogpt":
        if size % 2:
            raise UserError(f"{path} has {size} bytes, an odd number: not nanoGPT's uint16 tokens")
        return {"file": str(path.resolve()), "tokens": size // 2, "offset": 0}
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    if header.size < 3 or header[0] != LLMC_MAGIC or header[1] != LLMC_VERSION:
        found = header[:2].tolist() if header.size >= 2 else "a short file"
        raise UserError(f"{path} is not an llm.c token shard: its header starts {found}, expected magic "
                        f"{LLMC_MAGIC} and version {LLMC_VERSION}")
    tokens = int(header[2])
    if size != LLMC_HEADER_BYTES + 2 * tokens:
        raise UserError(f"{path} has {size} bytes but its header counts {tokens} tokens "
                        f"({LLMC_HEADER_BYTES + 2 * tokens} bytes): a truncated or damaged shard")
    return {"file": str(path.resolve()), "tokens": tokens, "offset": LLMC_HEADER_BYTES}


def split_files(text_path: str, val_path: str | None, fmt: str) -> dict[str, list[Path]]:
    """The train and val shards: text_path and val_path, or in a folder the files named *train* and *val*."""
    if val_path:
        return {"train": input_files(text_path, fmt), "val": input_files(val_path, fmt, "data.val_path")}
    files = input_files(text_path, fmt)
    split = {name: [f for f in files if name in f.name] for name in ("train", "val")}
    if not split["train"] or not split["val"]:
        raise UserError(f"data.text_path={text_path!r} must hold shards named *train* and *val* (nanoGPT's "
                        f"train.bin and val.bin, llm.c's *_train_*.bin and *_val_*.bin), or give data.val_path")
    return split


def describe(text_path: str, val_path: str | None, fmt: str) -> dict[str, Any]:
    """meta.json's `splits` for shards read in place."""
    splits = {}
    for split, files in split_files(text_path, val_path, fmt).items():
        shards = [shard_entry(f, fmt) for f in files]
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "shards": shards}
    return splits


def check_tokens(splits: dict[str, Any], vocab_size: int, probe: int = 1 << 20) -> None:
    """Refuse shards whose tokens (probed: the first `probe` of each shard) lie outside the tokenizer's range."""
    for split in splits.values():
        for s in split["shards"]:
            head = np.memmap(s["file"], dtype="<u2", mode="r", offset=s["offset"], shape=(min(s["tokens"], probe),))
            if head.size and int(head.max()) >= vocab_size:
                raise UserError(f"{s['file']} holds token {int(head.max())}, outside the tokenizer's vocabulary of "
                                f"{vocab_size}: the shards were made with another tokenizer (data.tokenizer_file)")
