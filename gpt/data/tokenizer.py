"""Tokenizers trained locally on the corpus (never fetched from a hub), and how they are saved and loaded.

`save(dir)` writes `dir/tokenizer.json`: `{"kind": "char", "chars": [...]}` for the character tokenizer, the
Hugging Face `tokenizers` JSON for byte-level BPE. `load_tokenizer(dir)` reads either.
"""
from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Sequence
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gpt.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"
MIN_BPE_VOCAB = 256 + 1  # every byte, plus <|endoftext|>


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str | Path) -> None: ...


class CharTokenizer:
    """One token per character; the vocabulary is the sorted distinct characters of the text (nanoGPT)."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        if len(self.stoi) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise ValueError("chars must be distinct single characters")

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise UserError(f"character {e.args[0]!r} is not in this character tokenizer's vocabulary "
                            f"({self.vocab_size} characters learned from the training text)") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": self.kind, "chars": self.chars}, ensure_ascii=False), encoding="utf-8")


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization), trained with Hugging Face `tokenizers`."""

    kind = "bpe"

    def __init__(self, hf: HFTokenizer):
        self.hf = hf

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        if vocab_size < MIN_BPE_VOCAB:
            raise ValueError(f"vocab_size must be at least {MIN_BPE_VOCAB}, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator([text], trainer=trainer, length=1)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer that `save(directory)` wrote."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"no tokenizer in {directory}: {path} is missing; prepare the data first "
                        f"(python -m gpt.data.prepare --help)")
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    if data.get("kind") == CharTokenizer.kind:
        return CharTokenizer(data["chars"])
    if "model" in data:
        return BPETokenizer(HFTokenizer.from_str(text))
    raise UserError(f"{path} is neither a character tokenizer nor a Hugging Face tokenizers file")
