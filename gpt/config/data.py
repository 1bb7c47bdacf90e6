"""The data section (configs/data/): which corpus, where its prepared shards go, and how it is tokenized."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gpt.errors import ConfigError

TOKENIZERS = ("char", "bpe", "hf")
TEXT_FORMATS = ("text", "jsonl", "parquet")  # tokenized by preparation
TOKEN_FORMATS = ("nanogpt", "llmc")  # pre-tokenized shards, read in place
FORMATS = TEXT_FORMATS + TOKEN_FORMATS
DEFAULT_SHARD_TOKENS = 100_000_000
PREPARE_ON = ("login", "job")
MIN_BPE_VOCAB = 256 + 1  # every byte, plus <|endoftext|>
DEFAULT_BPE_VOCAB = 2048  # tokenizer=bpe with vocab_size null: the shakespeare_bpe preset's


def vocab_to_learn(tokenizer: str, vocab_size: int | None) -> int | None:
    """data.vocab_size as preparation uses it: null with tokenizer=bpe learns DEFAULT_BPE_VOCAB tokens."""
    return DEFAULT_BPE_VOCAB if tokenizer == "bpe" and vocab_size is None else vocab_size


@dataclass
class SourceConfig:
    """One corpus of a mixture (data.sources): its inputs, where it is prepared, and its share of the samples."""

    text_path: str = "???"
    dir: str = "???"
    weight: float = 1.0
    format: str = "text"
    field: str = "text"
    val_path: str | None = None


@dataclass
class DataConfig:
    """The launcher makes text_path, val_path, tokenizer_file and dir absolute before use."""

    name: str = "shakespeare_char"
    # the inputs: a file, a folder or a glob; relative paths are resolved from the directory you launch from
    text_path: str = "data/tinyshakespeare/input.txt"
    format: str = "text"  # text | jsonl | parquet (tokenized here) | nanogpt | llmc (token shards read in place)
    field: str = "text"  # jsonl: the documents' text field; parquet: the text column
    val_path: str | None = None  # validation inputs; null: val_fraction of the documents
    dir: str = "data/shakespeare_char"  # prepared token shards
    tokenizer: str = "char"  # char | bpe (learned from the corpus) | hf (tokenizer_file)
    tokenizer_file: str | None = None  # tokenizer=hf: a Hugging Face tokenizer.json
    vocab_size: int | None = None  # char, hf: from the tokenizer (null); bpe: how many tokens to learn (null: 2048)
    val_fraction: float = 0.1
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    workers: int = 0  # preparation processes; 0: one per core
    sources: list[SourceConfig] = dataclasses.field(default_factory=list)  # a weighted mixture instead of text_path
    # cluster=slurm: where unprepared data is prepared. login: here, before submitting (seconds for small corpora,
    # no queueing); job: a preparation job of prepare_nodes nodes that the training jobs depend on
    prepare_on: str = "login"
    prepare_nodes: int = 1

    def validate(self) -> None:
        check_settings(self.tokenizer, self.vocab_size, self.val_fraction, self.shard_tokens)
        check_inputs(self.format, self.tokenizer, self.tokenizer_file, "data")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError("data.workers", self.workers, "0 (one per core) or a positive integer")
        if self.prepare_on not in PREPARE_ON:
            raise ConfigError("data.prepare_on", self.prepare_on, f"one of {', '.join(PREPARE_ON)}")
        if isinstance(self.prepare_nodes, bool) or not isinstance(self.prepare_nodes, int) or self.prepare_nodes < 1:
            raise ConfigError("data.prepare_nodes", self.prepare_nodes, "a positive integer (nodes of the preparation "
                              "job, data.prepare_on=job)")
        for i, source in enumerate(self.sources):
            key = f"data.sources[{i}]"
            check_inputs(source.format, self.tokenizer, self.tokenizer_file, key)
            if isinstance(source.weight, bool) or not source.weight > 0:
                raise ConfigError(f"{key}.weight", source.weight, "a positive number")
        if self.sources and self.tokenizer in ("char", "bpe"):
            raise ConfigError("data.tokenizer", self.tokenizer, "hf: one tokenizer.json for every source of "
                              "data.sources")


def check_inputs(fmt: str, tokenizer: str, tokenizer_file: str | None, key: str) -> None:
    """Raise ConfigError for a format and tokenizer that cannot go together."""
    if fmt not in FORMATS:
        raise ConfigError(f"{key}.format", fmt, f"one of {', '.join(FORMATS)}")
    if tokenizer == "hf" and not tokenizer_file:
        raise ConfigError("data.tokenizer_file", tokenizer_file, "the path of a tokenizer.json for tokenizer=hf")
    if tokenizer != "hf" and tokenizer_file:
        raise ConfigError("data.tokenizer_file", tokenizer_file, f"null for tokenizer={tokenizer} (or tokenizer=hf)")
    if fmt in TOKEN_FORMATS and tokenizer != "hf":
        raise ConfigError("data.tokenizer", tokenizer, f"hf for format={fmt}, with tokenizer_file the tokenizer.json "
                          f"that made the shards (GPT-2's for nanoGPT's and llm.c's)")


def check_settings(tokenizer: str, vocab_size: int | None, val_fraction: float, shard_tokens: int) -> None:
    """Raise ConfigError (naming the data.* key) for preparation settings that cannot work."""
    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if tokenizer not in TOKENIZERS:
        raise ConfigError("data.tokenizer", tokenizer, f"one of {', '.join(TOKENIZERS)}")
    vocab_size = vocab_to_learn(tokenizer, vocab_size)
    if tokenizer == "bpe" and (not is_int(vocab_size) or vocab_size < MIN_BPE_VOCAB):
        raise ConfigError("data.vocab_size", vocab_size,
                          f"an integer >= {MIN_BPE_VOCAB} for tokenizer=bpe (256 bytes + <|endoftext|>)")
    if tokenizer == "char" and vocab_size is not None:
        raise ConfigError("data.vocab_size", vocab_size, "null for tokenizer=char (the vocabulary comes from the text)")
    if tokenizer == "hf" and vocab_size is not None:
        raise ConfigError("data.vocab_size", vocab_size, "null for tokenizer=hf (the vocabulary comes from its file)")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 0.5:
        raise ConfigError("data.val_fraction", val_fraction, "a fraction strictly between 0 and 0.5")
    if not is_int(shard_tokens) or shard_tokens <= 0:
        raise ConfigError("data.shard_tokens", shard_tokens, "a positive integer")
