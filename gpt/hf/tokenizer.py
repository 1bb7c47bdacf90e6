"""The run's tokenizer as `transformers` loads it (tokenizer.json, tokenizer_config.json, special_tokens_map.json),
encoding exactly as training did. The character tokenizer becomes a `tokenizers` WordLevel model over single
characters: every character its own piece (whitespace and newlines included), concatenated back by decoding, and a
character training never saw refused as training refuses it (no unknown token)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from gpt.data.tokenizer import END_OF_TEXT, BPETokenizer, CharTokenizer, Tokenizer


def char_as_hf(tokenizer: CharTokenizer) -> HFTokenizer:
    hf = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(tokenizer.chars)}, unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    if tokenizer.end_of_text:  # its id follows the characters, as in CharTokenizer
        hf.add_special_tokens([END_OF_TEXT])
    return hf


def fast_tokenizer(tokenizer: Tokenizer, block_size: int) -> Any:
    """A transformers PreTrainedTokenizerFast of the run's tokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf = char_as_hf(tokenizer) if isinstance(tokenizer, CharTokenizer) else tokenizer.hf
    assert isinstance(tokenizer, (CharTokenizer, BPETokenizer))
    eot = None if tokenizer.eot is None else hf.id_to_token(tokenizer.eot)
    # what the exported models take: GPT-2's would add token_type_ids' embeddings to every position, Llama's refuse them
    return PreTrainedTokenizerFast(tokenizer_object=hf, eos_token=eot, bos_token=eot, model_max_length=block_size,
                                   clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])


def save_tokenizer(tokenizer: Tokenizer, block_size: int, out: Path) -> None:
    fast_tokenizer(tokenizer, block_size).save_pretrained(str(out))
