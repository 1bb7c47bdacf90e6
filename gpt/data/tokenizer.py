"""Tokenizers trained locally on the corpus, or the user's own Hugging Face `tokenizer.json` or SentencePiece
`tokenizer.model` (never fetched from a hub), and how they are saved and loaded.

`save(dir)` writes `dir/tokenizer.json`: `{"kind": "char", "chars": [...]}` for the character tokenizer, the
Hugging Face `tokenizers` JSON otherwise. `load_tokenizer(dir)` reads either. Documents are separated by the
end-of-text token (`eot`): BPE's <|endoftext|>, a file's own end-of-text or end-of-sequence token, and for the
character tokenizer one id after its characters (only when the corpus has several documents).
"""
from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gpt.config.data import MIN_BPE_VOCAB
from gpt.errors import UserError
from gpt.hf import sentencepiece

TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"
# what tokenizer.json files call their end of a document: GPT-2, LLaMA 3, LLaMA 2/Mistral, Gemma
END_TOKENS = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>")


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eot(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str | Path) -> None: ...


class CharTokenizer:
    """One token per character; the vocabulary is the sorted distinct characters of the text (nanoGPT)."""

    kind = "char"

    def __init__(self, chars: Sequence[str], end_of_text: bool = False):
        self.chars = list(chars)
        self.end_of_text = end_of_text
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        if len(self.stoi) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise ValueError("chars must be distinct single characters")

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + self.end_of_text

    @property
    def eot(self) -> int | None:
        return len(self.chars) if self.end_of_text else None

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise UserError(f"character {e.args[0]!r} is not in this character tokenizer's vocabulary "
                            f"({len(self.chars)} characters learned from the training text)") from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else END_OF_TEXT for i in ids)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"kind": self.kind, "chars": self.chars, **({"end_of_text": True} if self.end_of_text else {})}
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


class BPETokenizer:
    """A Hugging Face `tokenizers` tokenizer: byte-level BPE (GPT-2 style pre-tokenization) trained here, or the
    user's tokenizer.json (kind "hf")."""

    kind = "bpe"

    def __init__(self, hf: HFTokenizer, kind: str = "bpe"):
        self.hf, self.kind = hf, kind
        vocab = hf.get_vocab(with_added_tokens=True)
        self._eot = next((vocab[t] for t in END_TOKENS if t in vocab), None)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """The user's tokenizer.json, or a SentencePiece tokenizer.model converted (UserError when it cannot be
        read)."""
        if str(path).endswith(sentencepiece.SUFFIX):
            return cls(sentencepiece.from_sentencepiece(path), kind="hf")
        try:
            return cls(HFTokenizer.from_file(str(path)), kind="hf")
        except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
            raise UserError(f"data.tokenizer_file={str(path)!r} is not a Hugging Face tokenizer.json: {e}") from None

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int) -> BPETokenizer:
        if vocab_size < MIN_BPE_VOCAB:
            raise ValueError(f"vocab_size must be at least {MIN_BPE_VOCAB}, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator([text] if isinstance(text, str) else text, trainer=trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot(self) -> int | None:
        return self._eot

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

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
        return CharTokenizer(data["chars"], data.get("end_of_text", False))
    if "model" in data:
        return BPETokenizer(HFTokenizer.from_str(text))
    raise UserError(f"{path} is neither a character tokenizer nor a Hugging Face tokenizers file")
