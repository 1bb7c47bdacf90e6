"""A run's identity (run.json) covers a corpus of many files: a folder's listing, not one file's content."""
from __future__ import annotations

import os

from gpt.config.schema import run_config
from helpers import compose
from launch.run.identity import identity


def test_a_folder_of_inputs_identifies_the_run(tmp_path):
    folder = tmp_path / "owt"
    folder.mkdir()
    for i in range(3):
        (folder / f"doc_{i}.txt").write_text(f"document {i}\n")
    run = run_config(compose("model=tiny", f"data.text_path={folder}", f"data.dir={tmp_path / 'prepared'}"))
    values, corpus = identity(run)
    assert corpus["size"] == sum(f.stat().st_size for f in folder.iterdir())
    assert identity(run, corpus) == (values, corpus)  # unchanged: the same record
    (folder / "doc_1.txt").write_text("another document\n")
    os.utime(folder / "doc_1.txt", ns=(1, 1))
    changed, _ = identity(run, corpus)
    assert changed["data.text_md5"] != values["data.text_md5"]
