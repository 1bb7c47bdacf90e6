"""Data: tokenizers, preparing token shards (checked against the data section, gpt.config.data), deterministic
reshardable batches.

This package's top level stays free of torch so the launcher can validate and prepare data cheaply before
spawning ranks. Preparing lives in gpt.data.prepare (also a command line), the batch loaders in gpt.data.loader.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from gpt.config.data import DataConfig
from gpt.data.tokenizer import TOKENIZER_FILE, BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from gpt.errors import ConfigError, UserError

__all__ = ["data_identity", "identities", "ensure_prepared", "is_prepared", "check_tokenizer_vocab",
           "check_vocab", "read_meta", "Tokenizer", "CharTokenizer", "BPETokenizer", "load_tokenizer"]

META_FILE = "meta.json"
SPLITS = ("train", "val")


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared directory; UserError when the directory was never prepared."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"{data_dir} holds no prepared data ({META_FILE} is missing); prepare it with "
                        f"python -m gpt.data.prepare --text TEXT --out {data_dir} --tokenizer char|bpe")
    return json.loads(path.read_text(encoding="utf-8"))


VOCAB_MULTIPLE = 64  # a vocabulary from someone else's tokenizer is padded up to this (nanoGPT: 50257 -> 50304)


def check_tokenizer_vocab(cfg: DataConfig, model_vocab_size: int | None) -> None:
    """A tokenizer file's vocabulary against the model's, before anything is prepared."""
    cfg.validate()
    if cfg.tokenizer_file and model_vocab_size is not None:
        vocab = BPETokenizer.from_file(cfg.tokenizer_file).vocab_size
        if model_vocab_size < vocab:
            raise ConfigError("model.vocab_size", model_vocab_size, f"at least {vocab}, the vocabulary of "
                              f"data.tokenizer_file={cfg.tokenizer_file} (or null: {padded_vocab(vocab)})")


def _each_source(cfg: DataConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """(inputs, prepared dir, prepare()'s other arguments) of the corpus, or of each source of a mixture."""
    paths = [cfg.dir, *(p for s in cfg.sources for p in (s.dir, s.text_path))] if cfg.sources else [
        cfg.dir, cfg.text_path]
    if not all(Path(p).is_absolute() for p in paths):
        raise ValueError(f"data paths {paths} must be made absolute by the caller")
    common = dict(tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction,
                  shard_tokens=cfg.shard_tokens, tokenizer_file=cfg.tokenizer_file, workers=cfg.workers)
    return [(s.text_path, s.dir, dict(fmt=s.format, field=s.field, val_path=s.val_path, **common))
            for s in (cfg.sources or [cfg])]


def is_prepared(cfg: DataConfig) -> bool:
    """Whether ensure_prepared would have nothing to do (the inputs are listed, not read)."""
    from gpt.data import prepare

    prepared = all(prepare.is_source_prepared(text, out, **kw) for text, out, kw in _each_source(cfg))
    return prepared and (not cfg.sources or (Path(cfg.dir) / META_FILE).is_file())


def ensure_prepared(cfg: DataConfig, model_vocab_size: int | None = None, node: int = 0, nodes: int = 1) -> Path:
    """Prepare cfg.dir from its inputs (or each of cfg.sources, and cfg.dir as their mixture) unless it is already
    prepared the same way; returns cfg.dir. A tokenizer file's vocabulary is checked against the model's first.
    `node` of `nodes`: this task's share of a preparation job (gpt.data.prepare.prepare)."""
    # Imported here, not at the top: `python -m gpt.data.prepare` must find the module not yet imported.
    from gpt.data.prepare import prepare

    check_tokenizer_vocab(cfg, model_vocab_size)
    dirs = [prepare(text, out, node=node, nodes=nodes, **kw) for text, out, kw in _each_source(cfg)]
    if not cfg.sources:
        return dirs[0]
    if node:
        return Path(cfg.dir)
    return write_mixture(Path(cfg.dir), dirs, [s.weight for s in cfg.sources])


def write_mixture(out: Path, dirs: list[Path], weights: list[float]) -> Path:
    """out/meta.json naming the prepared sources and their weights (normalised), and their common tokenizer."""
    metas = [read_meta(d) for d in dirs]
    if len({m["vocab_size"] for m in metas}) > 1 or len({m["dtype"] for m in metas}) > 1:
        found = ", ".join(f"{d}: {m['vocab_size']} {m['dtype']}" for d, m in zip(dirs, metas))
        raise UserError(f"the sources of data.sources were tokenized differently ({found})")
    total = sum(weights)
    sources = [{"dir": str(d), "weight": w / total} for d, w in zip(dirs, weights)]
    meta = {"vocab_size": metas[0]["vocab_size"], "dtype": metas[0]["dtype"], "pad_vocab": True, "sources": sources,
            "fingerprint": _mixed(metas, sources, "fingerprint"),
            "listing": _mixed(metas, sources, "listing")}
    if (out / META_FILE).is_file():  # as gpt.data.prepare.refuse_other: runs may read it
        before = read_meta(out)
        if before.get("sources") != sources:
            raise UserError(f"{out} holds another mixture of data.sources ({before.get('sources')}); runs may read "
                            f"it, so it is never written again in place: choose another data.dir, or delete {out} "
                            "once no run reads it")
        if before == meta:
            return out
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dirs[0] / TOKENIZER_FILE, out / TOKENIZER_FILE)
    tmp = out / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, out / META_FILE)
    return out


def _mixed(metas: list[dict[str, Any]], sources: list[dict[str, Any]], key: str) -> str:
    """A mixture's fingerprint (or listing) from its sources' and their weights (a source prepared before folders
    recorded a listing: its fingerprint was its listing)."""
    mixed = json.dumps([[m.get(key, m.get("fingerprint")), s["weight"]] for m, s in zip(metas, sources)]).encode()
    return hashlib.md5(mixed, usedforsecurity=False).hexdigest()


def data_identity(data_dir: str | Path) -> str | None:
    """The fingerprint of a prepared folder, of its inputs' content and settings (of a mixture: of its sources' and
    weights); None for a folder prepared before folders recorded one."""
    return read_meta(data_dir).get("fingerprint")


def identities(meta: dict[str, Any]) -> set[str]:
    """What a record of the data a folder holds (run.json's, a checkpoint's) may say: its fingerprint, or what a
    record made before fingerprints were of the content says, its listing (its inputs' paths, sizes and times, and
    the settings, all unchanged since)."""
    return {v for v in (meta.get("fingerprint"), meta.get("listing")) if v is not None}


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def check_vocab(model_vocab_size: int | None, data_dir: str | Path) -> int:
    """The vocabulary size the model should use: its own, or the tokenizer's when it has none (a Hugging Face
    tokenizer's padded up to a multiple of 64, as nanoGPT pads GPT-2's).

    Raises ConfigError when the model's vocabulary is smaller than the tokenizer's (padding it larger is fine).
    """
    meta = read_meta(data_dir)
    data_vocab = meta["vocab_size"]
    if model_vocab_size is None:
        return padded_vocab(data_vocab) if meta.get("pad_vocab") else data_vocab
    if model_vocab_size < data_vocab:
        raise ConfigError("model.vocab_size", model_vocab_size,
                          f"at least {data_vocab}, the tokenizer's vocabulary in {data_dir} "
                          f"(or null to take it from the tokenizer)")
    return model_vocab_size
