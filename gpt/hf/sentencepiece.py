"""A SentencePiece `tokenizer.model`, as LLaMA-2-style folders ship it, as a `tokenizers` tokenizer, without the
sentencepiece package. The file is a protobuf (ModelProto), read with the schema transformers bundles (protobuf comes
with tensorboard), and converted as transformers converts LLaMA's (LlamaConverter: BPE or unigram with byte
fallback, a "▁" before the text and for every space). transformers' converter asks sentencepiece only for the
vocabulary in id order, which the protobuf holds. A model whose normalisation that conversion does not reproduce
(spm_train's defaults: NFKC, extra whitespace removed) is refused naming the setting."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpt.errors import UserError

SUFFIX = ".model"
BPE, UNIGRAM = 2, 1  # TrainerSpec.ModelType


def read_model(path: Path) -> Any:
    """The ModelProto of `path`; UserError when it is not one."""
    from google.protobuf.message import DecodeError
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (DecodeError, OSError) as e:
        raise UserError(f"data.tokenizer_file={path} is not a SentencePiece model: {e}") from None
    if not proto.pieces:
        raise UserError(f"data.tokenizer_file={path} is not a SentencePiece model: it has no pieces")
    return proto


def check_convertible(proto: Any, path: Path) -> None:
    """The settings LLaMA's conversion reproduces exactly, the first that differs in one line."""
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    wanted = {
        "normalizer_spec.name": (norm.name or "identity", "identity"),
        "normalizer_spec.precompiled_charsmap": ("set" if norm.precompiled_charsmap else "empty", "empty"),
        "normalizer_spec.remove_extra_whitespaces": (norm.remove_extra_whitespaces, False),
        "normalizer_spec.add_dummy_prefix": (norm.add_dummy_prefix, True),
        "normalizer_spec.escape_whitespaces": (norm.escape_whitespaces, True),
        "trainer_spec.treat_whitespace_as_suffix": (trainer.treat_whitespace_as_suffix, False),
        "trainer_spec.model_type": (trainer.model_type, "1 (unigram) or 2 (bpe)"),
        "trainer_spec.unk_id": (trainer.unk_id, 0),
    }
    for key, (value, valid) in wanted.items():
        if value != valid and not (key == "trainer_spec.model_type" and value in (BPE, UNIGRAM)):
            raise UserError(f"data.tokenizer_file={path}: {key} is {value}, and only {valid} is converted exactly "
                            "(LLaMA's settings); write the folder's tokenizer.json with transformers and sentencepiece "
                            "(AutoTokenizer.from_pretrained(PATH).save_pretrained(PATH)) and use that")


def from_sentencepiece(path: str | Path) -> Any:
    """The `tokenizers.Tokenizer` that transformers' LLaMA tokenizer builds from `path`, with the folder's
    tokenizer_config.json `legacy` and `add_prefix_space` where it sets them."""
    from transformers.convert_slow_tokenizer import LlamaConverter, generate_merges

    path = Path(path)
    proto = read_model(path)
    check_convertible(proto, path)
    pieces = [p.piece for p in proto.pieces]
    config_file = path.with_name("tokenizer_config.json")
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}

    class Vocabulary:  # what transformers' SentencePieceExtractor gives, from the protobuf
        def __init__(self, _: str):
            self.vocab = {piece: i for i, piece in enumerate(pieces)}

        def extract(self, vocab_scores=None):
            return self.vocab, generate_merges(self.vocab, vocab_scores)

    class Slow:  # what LlamaConverter reads of transformers' slow LlamaTokenizer (its defaults where unset)
        vocab_file = str(path)
        legacy = config.get("legacy") is not False
        add_prefix_space = config.get("add_prefix_space") is not False

        @staticmethod
        def convert_ids_to_tokens(i: int) -> str:
            return pieces[i]

    class Converter(LlamaConverter):
        SpmExtractor = Vocabulary

    return Converter(Slow()).converted()
