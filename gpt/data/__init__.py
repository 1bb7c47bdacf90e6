"""Data: the data config and its checks, tokenizers, preparing token shards, deterministic reshardable batches.

This package's top level stays free of torch so the launcher can validate and prepare data cheaply before
spawning ranks. Preparing lives in gpt.data.prepare (also a command line), the batch loaders in gpt.data.loader.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from gpt.data.tokenizer import MIN_BPE_VOCAB, BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from gpt.config import from_section
from gpt.errors import ConfigError, UserError

__all__ = ["DataConfig", "ensure_prepared", "check_vocab", "check_settings", "read_meta",
           "Tokenizer", "CharTokenizer", "BPETokenizer", "load_tokenizer"]

META_FILE = "meta.json"
SPLITS = ("train", "val")
TOKENIZERS = ("char", "bpe")
DEFAULT_SHARD_TOKENS = 100_000_000


@dataclass
class DataConfig:
    """Mirrors configs/data/*.yaml. The launcher makes text_path and dir absolute before use."""

    name: str = "shakespeare_char"
    text_path: str = "data/tinyshakespeare/input.txt"
    dir: str = "data/shakespeare_char"
    tokenizer: str = "char"
    vocab_size: int | None = None  # char: from the text; bpe: how many tokens to learn
    val_fraction: float = 0.1
    shard_tokens: int = DEFAULT_SHARD_TOKENS

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        return from_section(cls, "data", d)

    def validate(self) -> None:
        check_settings(self.tokenizer, self.vocab_size, self.val_fraction, self.shard_tokens)


def check_settings(tokenizer: str, vocab_size: int | None, val_fraction: float, shard_tokens: int) -> None:
    """Raise ConfigError (naming the data.* key) for preparation settings that cannot work."""
    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if tokenizer not in TOKENIZERS:
        raise ConfigError("data.tokenizer", tokenizer, f"one of {', '.join(TOKENIZERS)}")
    if tokenizer == "bpe" and (not is_int(vocab_size) or vocab_size < MIN_BPE_VOCAB):
        raise ConfigError("data.vocab_size", vocab_size,
                          f"an integer >= {MIN_BPE_VOCAB} for tokenizer=bpe (256 bytes + <|endoftext|>)")
    if tokenizer == "char" and vocab_size is not None:
        raise ConfigError("data.vocab_size", vocab_size, "null for tokenizer=char (the vocabulary comes from the text)")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 0.5:
        raise ConfigError("data.val_fraction", val_fraction, "a fraction strictly between 0 and 0.5")
    if not is_int(shard_tokens) or shard_tokens <= 0:
        raise ConfigError("data.shard_tokens", shard_tokens, "a positive integer")


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared directory; UserError when the directory was never prepared."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"{data_dir} holds no prepared data ({META_FILE} is missing); prepare it with "
                        f"python -m gpt.data.prepare --text TEXT --out {data_dir} --tokenizer char|bpe")
    return json.loads(path.read_text(encoding="utf-8"))


def ensure_prepared(cfg: DataConfig) -> Path:
    """Prepare cfg.dir from cfg.text_path unless it is already prepared the same way; returns cfg.dir."""
    # Imported here, not at the top: `python -m gpt.data.prepare` must find the module not yet imported.
    from gpt.data.prepare import prepare

    cfg.validate()
    for key in ("text_path", "dir"):
        if not Path(getattr(cfg, key)).is_absolute():
            raise ValueError(f"data.{key}={getattr(cfg, key)!r} must be made absolute by the caller")
    return prepare(cfg.text_path, cfg.dir, cfg.tokenizer, cfg.vocab_size, cfg.val_fraction, cfg.shard_tokens)


def check_vocab(model_vocab_size: int | None, data_dir: str | Path) -> int:
    """The vocabulary size the model should use: its own, or the tokenizer's when it has none.

    Raises ConfigError when the model's vocabulary is smaller than the tokenizer's (padding it larger is fine).
    """
    data_vocab = read_meta(data_dir)["vocab_size"]
    if model_vocab_size is None:
        return data_vocab
    if model_vocab_size < data_vocab:
        raise ConfigError("model.vocab_size", model_vocab_size,
                          f"at least {data_vocab}, the tokenizer's vocabulary in {data_dir} "
                          f"(or null to take it from the tokenizer)")
    return model_vocab_size
