"""A run's corpus, as its data config names it: the record run.json keeps of it and, when that changed, in words
what changed (gpt.data.content, from the input files and the folders prepared from them). Torch-free."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gpt.config.data import DataConfig
from gpt.data.content import corpus_change, corpus_record
from gpt.data.inputs import corpus_files


def prepared_dirs(data: DataConfig) -> list[Path]:
    """The folders prepared from the corpus: each source's, or the data's own."""
    return [Path(s.dir) for s in data.sources] or [Path(data.dir)]


def record(data: DataConfig, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """run.json's record of the corpus (corpus_record), its content read only where `known` (the record before) and
    the prepared folders do not tell it. `data`'s paths are absolute."""
    prepared = prepared_dirs(data)
    files = corpus_files(data)
    return corpus_record(files, known, prepared)


def change(data: DataConfig, known: dict[str, Any] | None, corpus: dict[str, Any]) -> str:
    """data.text_md5's line of a refusal (corpus_change): `known`, run.json's record, against `corpus`, now's."""
    prepared = prepared_dirs(data)
    files = corpus_files(data)
    return corpus_change(files, prepared, known, corpus)
