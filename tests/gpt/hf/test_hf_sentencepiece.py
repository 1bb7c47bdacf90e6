"""A SentencePiece tokenizer.model in an init=hf folder (LLaMA-2 style), without the sentencepiece package: it is
prepared as data.tokenizer_file and encodes as SentencePiece's BPE does (merges by score, byte fallback for a
character the vocabulary lacks); a model whose normalisation the conversion does not reproduce is refused naming the
setting. The model is written in the test with SentencePiece's own protobuf schema, or trained on the corpus by
SentencePiece itself (the `sentencepiece` package, a test dependency only), whose encoding the conversion must give."""
from __future__ import annotations

import dataclasses

import pytest
import sentencepiece

from helpers import SHAKESPEARE

from gpt.config.data import DataConfig
from gpt.data.prepare import prepare
from gpt.data.tokenizer import BPETokenizer, load_tokenizer
from gpt.errors import ConfigError, UserError
from gpt.hf.folder import check_tokenizer

NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6  # SentencePiece.Type
BYTES = [f"<0x{b:02X}>" for b in range(256)]
# characters, then merges: a higher score merges first, as spm_train writes a BPE model's pieces
PIECES = ["▁", "t", "h", "e", "o", "r", "▁t", "he", "▁the", "or"]
IDS = {p: i for i, p in enumerate(["<unk>", "<s>", "</s>", *BYTES, *PIECES])}


def write_model(path, **normalizer) -> None:
    """A LLaMA-style BPE tokenizer.model: <unk>, <s>, </s>, the 256 byte pieces, then the vocabulary."""
    from transformers.convert_slow_tokenizer import import_protobuf  # here, not in every worker's collection

    proto = import_protobuf().ModelProto()
    proto.trainer_spec.model_type = 2  # BPE
    proto.trainer_spec.byte_fallback = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    for key, value in normalizer.items():
        setattr(proto.normalizer_spec, key, value)
    for piece, kind in [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL), *((b, BYTE) for b in BYTES)]:
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    for rank, piece in enumerate(PIECES):
        proto.pieces.add(piece=piece, score=-float(rank), type=NORMAL)
    path.write_bytes(proto.SerializeToString())


def test_a_sentencepiece_model_encodes_as_sentencepiece_bpe_does(tmp_path):
    write_model(tmp_path / "tokenizer.model")
    ours = BPETokenizer.from_file(tmp_path / "tokenizer.model")
    text = "the other thé"
    # "▁the" merges whole; "▁other" has no "▁o" piece; é is not in the vocabulary: its UTF-8 bytes
    expected = ["▁the", "▁", "o", "t", "he", "r", "▁t", "h", "<0xC3>", "<0xA9>"]
    assert ours.encode(text) == [IDS[p] for p in expected]
    assert ours.decode(ours.encode(text)) == text
    assert ours.vocab_size == len(IDS) and ours.eot == IDS["</s>"]


@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_a_model_trained_by_sentencepiece_on_the_corpus_encodes_as_sentencepiece_does(model_type, tmp_path):
    """LLaMA's settings (identity normalisation, whitespace kept, byte fallback), trained on the corpus's start and
    compared on its end: lines, and chunks across lines (a newline is not in the vocabulary: its byte)."""
    text = SHAKESPEARE.read_text()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text[:200_000].splitlines()), model_prefix=str(tmp_path / "sp"), vocab_size=500,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2)
    theirs = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    ours = BPETokenizer.from_file(tmp_path / "sp.model")
    held_out = text[-30_000:]
    samples = [line for line in held_out.splitlines() if line] + [held_out[i:i + 300] for i in range(0, 30_000, 300)]
    samples += ["Zoë’s café  at  2024\n\n\tend", " leading space", "trailing space "]
    differ = [s for s in samples if ours.encode(s) != theirs.encode(s)]
    assert not differ, (len(differ), differ[:3])
    assert ours.vocab_size == theirs.get_piece_size() and ours.eot == theirs.eos_id()
    assert all(ours.decode(ours.encode(s)) == s for s in samples[-5:])


def test_an_init_folder_with_only_a_tokenizer_model_prepares_with_it(tmp_path):
    folder, text = tmp_path / "llama", tmp_path / "corpus.txt"
    folder.mkdir()
    write_model(folder / "tokenizer.model")
    text.write_text("the other " * 200)
    data = dataclasses.replace(DataConfig(), tokenizer="hf", tokenizer_file=str(folder / "tokenizer.model"))
    check_tokenizer(folder, data)  # accepted at planning
    with pytest.raises(ConfigError, match=r"^data.tokenizer_file=None .*tokenizer.model with data.tokenizer=hf"):
        check_tokenizer(folder, DataConfig())
    out = prepare(text, tmp_path / "prepared", tokenizer="hf", tokenizer_file=folder / "tokenizer.model")
    assert load_tokenizer(out).encode("the other") == [IDS[p] for p in ["▁the", "▁", "o", "t", "he", "r"]]


@pytest.mark.parametrize("setting, key", [
    ({"name": "nmt_nfkc"}, "normalizer_spec.name is nmt_nfkc"),
    ({"remove_extra_whitespaces": True}, "normalizer_spec.remove_extra_whitespaces is True"),
])
def test_a_sentencepiece_model_normalised_otherwise_is_refused_naming_the_setting(setting, key, tmp_path):
    write_model(tmp_path / "tokenizer.model", **setting)
    with pytest.raises(UserError, match=rf"^data.tokenizer_file={tmp_path}/tokenizer.model: {key}, and only"):
        BPETokenizer.from_file(tmp_path / "tokenizer.model")
