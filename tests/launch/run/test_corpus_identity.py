"""A run's identity (run.json) covers a corpus of many files: a folder's listing, not one file's content."""
from __future__ import annotations

import json
import os
import shutil

import pytest

import launch.run.identity as identity_module
from launch import launch_config
from gpt.data import read_meta
from gpt.data.prepare import prepare
from gpt.errors import UserError
from helpers import SHAKESPEARE, compose
from launch.rank.job_env import JobEnvironment
from launch.run.identity import check_run_folder, identity, record_data


def test_a_folder_of_inputs_identifies_the_run(tmp_path):
    folder = tmp_path / "owt"
    folder.mkdir()
    for i in range(3):
        (folder / f"doc_{i}.txt").write_text(f"document {i}\n")
    run = launch_config.parse(compose("model=tiny", f"data.text_path={folder}", f"data.dir={tmp_path / 'prepared'}"))
    values, corpus = identity(run)
    assert corpus["size"] == sum(f.stat().st_size for f in folder.iterdir())
    assert identity(run, corpus) == (values, corpus)  # unchanged: the same record
    (folder / "doc_1.txt").write_text("another document\n")
    os.utime(folder / "doc_1.txt", ns=(1, 1))
    changed, _ = identity(run, corpus)
    assert changed["data.text_md5"] != values["data.text_md5"]


def test_run_json_records_the_prepared_data_and_a_run_continues_only_on_it(tmp_path, monkeypatch):
    """The data folder deleted and prepared again from the same corpus with other settings, under a run with a
    checkpoint: the command is refused before anything runs, in one line naming both fingerprints. A run.json
    from before the record continues, and gets it."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    run = launch_config.parse(compose("model=tiny", f"data.text_path={SHAKESPEARE}", f"data.dir={data}"))
    prepare(SHAKESPEARE, data)
    fingerprint = read_meta(data)["fingerprint"]
    check_run_folder(run, run_dir, JobEnvironment({})).record(run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["data"] == {"dir": str(data), "fingerprint": fingerprint}

    monkeypatch.setattr(identity_module, "newest_step", lambda run_dir: 4)  # the run has a checkpoint
    shutil.rmtree(data)
    prepare(SHAKESPEARE, data, val_fraction=0.2)
    with pytest.raises(UserError, match=f"trained \\(to step 4\\) on data with fingerprint {fingerprint} .*now holds "
                       f"data with fingerprint {read_meta(data)['fingerprint']}") as e:
        check_run_folder(run, run_dir, JobEnvironment({}))
    assert "\n" not in str(e.value)

    del record["data"]  # written before run.json recorded the data
    (run_dir / "run.json").write_text(json.dumps(record))
    check_run_folder(run, run_dir, JobEnvironment({})).record(run_dir)
    assert json.loads((run_dir / "run.json").read_text())["data"]["fingerprint"] == read_meta(data)["fingerprint"]
    record_data(run_dir, str(data), "another")  # rank 0 records what it trains on (data prepared in a job)
    assert json.loads((run_dir / "run.json").read_text())["data"] == {"dir": str(data), "fingerprint": "another"}


@pytest.mark.slow
def test_data_prepared_again_by_the_planning_itself_is_refused_before_the_record(tmp_path, monkeypatch):
    """The data folder deleted under a run with a checkpoint: the check finds nothing prepared, planning prepares it
    from other settings, and the record refuses it rather than write the new fingerprint over the run's."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    run = launch_config.parse(compose("model=tiny", f"data.text_path={SHAKESPEARE}", f"data.dir={data}"))
    prepare(SHAKESPEARE, data)
    check_run_folder(run, run_dir, JobEnvironment({})).record(run_dir)
    before = (run_dir / "run.json").read_text()
    monkeypatch.setattr(identity_module, "newest_step", lambda run_dir: 4)
    shutil.rmtree(data)
    checked = check_run_folder(run, run_dir, JobEnvironment({}))
    prepare(SHAKESPEARE, data, val_fraction=0.2)  # as planning would, with other settings
    with pytest.raises(UserError, match="now holds data with fingerprint"):
        checked.record(run_dir)
    assert (run_dir / "run.json").read_text() == before
