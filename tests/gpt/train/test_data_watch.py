"""A data folder prepared again under a running run is said at once (rank 0, one line), not found by the next attempt
hundreds of steps later; an unchanged folder says nothing, and other ranks never look."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

from gpt.train.data_watch import DataWatch


def folder(tmp_path, fingerprint: str):
    (tmp_path / "meta.json").write_text(json.dumps({"fingerprint": fingerprint}))
    return tmp_path


def test_a_folder_prepared_again_under_the_run_is_said_once(tmp_path, caplog):
    data = folder(tmp_path, "abc")
    watch = DataWatch(data, is_main=True, every_s=0)
    watch.started(SimpleNamespace(data_fingerprint="abc"))
    with caplog.at_level(logging.WARNING, logger="gpt.train.data_watch"):
        watch.after_step(10)
        assert not caplog.records  # unchanged
        folder(tmp_path, "def")  # prepared again, from an edited corpus
        for step in (11, 12, 13):
            watch.after_step(step)
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"step 11: the prepared data in {data} changed under this run (its fingerprint abc is now "
                           "def): this attempt trains on the files it opened, but the next one")


def test_other_ranks_and_quiet_minutes_read_nothing(tmp_path, monkeypatch):
    reads = []
    monkeypatch.setattr("gpt.train.data_watch.data_identity", lambda d: reads.append(d) or "abc")
    other = DataWatch(tmp_path, is_main=False, every_s=0)
    other.started(SimpleNamespace(data_fingerprint="abc"))
    main = DataWatch(tmp_path, is_main=True, every_s=3600)
    main.started(SimpleNamespace(data_fingerprint="abc"))
    for step in range(100):
        other.after_step(step)
        main.after_step(step)
    assert reads == []
