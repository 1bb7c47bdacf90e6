"""A run's identity (run.json) is its corpus's content, of one file or many: its listing only saves reading it."""
from __future__ import annotations

import json
import os
import shutil

import pytest

import launch.run.identity as identity_module
from launch import launch_config
from gpt.data import ensure_prepared, read_meta
from gpt.data.content import listing_md5
from gpt.data.inputs import corpus_of
from gpt.data.loader import TokenDataset
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
    values, corpus = identity(run, corpus_of(run.data))
    assert corpus["size"] == sum(f.stat().st_size for f in folder.iterdir())
    assert identity(run, corpus_of(run.data), corpus) == (values, corpus)  # unchanged: the same record
    (folder / "doc_1.txt").write_text("another document\n")
    os.utime(folder / "doc_1.txt", ns=(1, 1))
    changed, _ = identity(run, corpus_of(run.data), corpus)
    assert changed["data.text_md5"] != values["data.text_md5"]


def test_run_json_records_the_prepared_data_and_a_run_continues_only_on_it(tmp_path, monkeypatch):
    """The data folder deleted and prepared again from the same corpus with other settings, under a run with a
    checkpoint: the command is refused before anything runs, in one line naming both fingerprints. A run.json
    from before the record continues, and gets it."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    run = launch_config.parse(compose("model=tiny", f"data.text_path={SHAKESPEARE}", f"data.dir={data}"))
    prepare(SHAKESPEARE, data)
    fingerprint = read_meta(data)["fingerprint"]
    check_run_folder(run, corpus_of(run.data), run_dir, JobEnvironment({})).record(run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["data"] == {"dir": str(data), "fingerprint": fingerprint}

    monkeypatch.setattr(identity_module, "newest_step", lambda run_dir: 4)  # the run has a checkpoint
    shutil.rmtree(data)
    prepare(SHAKESPEARE, data, val_fraction=0.2)
    with pytest.raises(UserError, match=f"trained \\(to step 4\\) on data with fingerprint {fingerprint} .*now holds "
                       f"data with fingerprint {read_meta(data)['fingerprint']}") as e:
        check_run_folder(run, corpus_of(run.data), run_dir, JobEnvironment({}))
    assert "\n" not in str(e.value)

    del record["data"]  # written before run.json recorded the data
    (run_dir / "run.json").write_text(json.dumps(record))
    check_run_folder(run, corpus_of(run.data), run_dir, JobEnvironment({})).record(run_dir)
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
    check_run_folder(run, corpus_of(run.data), run_dir, JobEnvironment({})).record(run_dir)
    before = (run_dir / "run.json").read_text()
    monkeypatch.setattr(identity_module, "newest_step", lambda run_dir: 4)
    shutil.rmtree(data)
    checked = check_run_folder(run, corpus_of(run.data), run_dir, JobEnvironment({}))
    prepare(SHAKESPEARE, data, val_fraction=0.2)  # as planning would, with other settings
    with pytest.raises(UserError, match="now holds data with fingerprint"):
        checked.record(run_dir)
    assert (run_dir / "run.json").read_text() == before


def write_corpus(folder):
    folder.mkdir(parents=True)
    for i in range(10):
        (folder / f"doc_{i}.txt").write_text(f"the text of document {i}\n" * 100)


def planned(run, run_dir):
    """What planning does with the data of a run with a checkpoint: check the folder, prepare, record."""
    checked = check_run_folder(run, corpus_of(run.data), run_dir, JobEnvironment({}))
    ensure_prepared(run.data)
    checked.record(run_dir)


def test_a_corpus_touched_or_copied_without_p_is_the_same_corpus(tmp_path, monkeypatch):
    """The corpus's identity is its content: touched (os.utime), or copied elsewhere without -p (a new path and a
    new modification time), the same command continues, its prepared folder is not prepared again, and the rank's
    check of a checkpoint's data passes."""
    corpus, data, run_dir = tmp_path / "corpus", tmp_path / "data", tmp_path / "run"
    write_corpus(corpus)
    overrides = ("model=tiny", f"data.dir={data}", "data.val_fraction=0.4")
    run = launch_config.parse(compose(*overrides, f"data.text_path={corpus}"))
    planned(run, run_dir)
    fingerprint, stamp = read_meta(data)["fingerprint"], (data / "meta.json").stat().st_mtime_ns
    monkeypatch.setattr(identity_module, "newest_step", lambda run_dir: 4)  # the run has a checkpoint

    for f in corpus.iterdir():
        os.utime(f, ns=(f.stat().st_mtime_ns + 10**9, f.stat().st_mtime_ns + 10**9))
    planned(run, run_dir)
    copy = tmp_path / "moved" / "corpus"
    copy.parent.mkdir()
    shutil.copytree(corpus, copy, copy_function=shutil.copyfile)  # cp -r without -p
    planned(launch_config.parse(compose(*overrides, f"data.text_path={copy}")), run_dir)
    assert read_meta(data)["fingerprint"] == fingerprint and (data / "meta.json").stat().st_mtime_ns == stamp
    assert TokenDataset(data, "train").fingerprint == fingerprint


def test_an_edited_corpus_is_refused_naming_the_file_and_how_it_changed(tmp_path, monkeypatch):
    text, data, run_dir = tmp_path / "input.txt", tmp_path / "data", tmp_path / "run"
    shutil.copyfile(SHAKESPEARE, text)
    run = launch_config.parse(compose("model=tiny", f"data.text_path={text}", f"data.dir={data}"))
    planned(run, run_dir)
    monkeypatch.setattr(identity_module, "newest_step", lambda run_dir: 4)
    with open(text, "a") as f:
        f.write("MORE.\n")
    with pytest.raises(UserError, match=f"data.text_md5: {text} changed \\(1,115,394 -> 1,115,400 bytes, modified "
                       ".* since the run trained on it. Restore its content to continue this run, or train on this "
                       "corpus as a new run \\(run=NAME\\) with a data.dir of its own"):
        check_run_folder(run, corpus_of(run.data), run_dir, JobEnvironment({}))
    with pytest.raises(UserError, match=f"other inputs or settings \\({text} changed \\(1,115,394 -> 1,115,400 "):
        ensure_prepared(run.data)  # the prepared folder refuses it too, as what it is: another corpus


def test_a_corpus_of_many_files_names_the_file_that_changed(tmp_path, monkeypatch):
    corpus, data, run_dir = tmp_path / "corpus", tmp_path / "data", tmp_path / "run"
    write_corpus(corpus)
    run = launch_config.parse(compose("model=tiny", f"data.text_path={corpus}", f"data.dir={data}",
                                      "data.val_fraction=0.4"))
    planned(run, run_dir)
    monkeypatch.setattr(identity_module, "newest_step", lambda run_dir: 4)
    (corpus / "doc_3.txt").write_text("edited\n")
    (corpus / "doc_x.txt").write_text("new\n")
    with pytest.raises(UserError, match=f"data.text_md5: {corpus / 'doc_3.txt'} changed \\(2,300 -> 7 bytes, "
                       f"modified .*; added: {corpus / 'doc_x.txt'} since the run trained on it"):
        check_run_folder(run, corpus_of(run.data), run_dir, JobEnvironment({}))


def as_written_before(data, run_dir, files):
    """The records of a run folder and its prepared folder as an earlier version wrote them: a fingerprint of the
    inputs' listing, no inputs.json; a corpus of several files recorded by its listing."""
    meta = read_meta(data)
    meta["fingerprint"] = meta.pop("listing")
    del meta["settings"]
    (data / "meta.json").write_text(json.dumps(meta))
    (data / "inputs.json").unlink()
    record = json.loads((run_dir / "run.json").read_text())
    record["corpus"] = {k: v for k, v in record["corpus"].items() if k != "listing"}
    record["corpus"]["md5"] = record["identity"]["data.text_md5"] = listing_md5(files)
    record["data"]["fingerprint"] = meta["fingerprint"]
    (run_dir / "run.json").write_text(json.dumps(record))
    return meta["fingerprint"]


def test_a_run_and_its_data_recorded_before_content_identity_continue(tmp_path, monkeypatch):
    """Written by an earlier version (identities of listings): the run continues, its record migrated to the
    content's md5; its data folder deleted and prepared again from the same untouched files is the run's data, to
    the launcher and to a rank checking a checkpoint's data fingerprint."""
    corpus, data, run_dir = tmp_path / "corpus", tmp_path / "data", tmp_path / "run"
    write_corpus(corpus)
    run = launch_config.parse(compose("model=tiny", f"data.text_path={corpus}", f"data.dir={data}",
                                      "data.val_fraction=0.4"))
    planned(run, run_dir)
    content_md5 = json.loads((run_dir / "run.json").read_text())["identity"]["data.text_md5"]
    old = as_written_before(data, run_dir, sorted(corpus.iterdir()))
    monkeypatch.setattr(identity_module, "newest_step", lambda run_dir: 4)
    planned(run, run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["identity"]["data.text_md5"] == record["corpus"]["md5"] == content_md5
    assert record["data"]["fingerprint"] == old and read_meta(data)["fingerprint"] == old  # not prepared again

    shutil.rmtree(data)
    planned(run, run_dir)
    assert read_meta(data)["fingerprint"] != old and old in TokenDataset(data, "train").identities
