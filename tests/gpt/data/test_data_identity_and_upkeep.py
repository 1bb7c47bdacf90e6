"""A corpus of many files at scale: its identity by each file's name, size and mtime_ns, the temp folders killed
preparations leave, and shards mapped only while they are read."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gpt.data.loader as loader
from gpt.data import read_meta
from gpt.data.content import corpus_record
from gpt.data.loader import TokenDataset
import gpt.data.prepare as prepare_module
from gpt.data.prepare import prepare
from gpt.data.temp_folders import OWNER_FILE, STALE_AGE_S
from gpt.errors import UserError


def write_corpus(folder: Path, texts: dict[str, str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text)
    return sorted(folder / name for name in texts)


def test_a_file_replaced_with_the_same_total_size_and_older_mtime_changes_the_corpus(tmp_path):
    files = write_corpus(tmp_path / "c", {"a.txt": "x" * 10, "b.txt": "y" * 20})
    for f in files:
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    known = corpus_record(files)
    # what `cp -p` or `rsync -a` of other files leaves: sizes swapped, total size and newest mtime unchanged
    files[0].write_text("z" * 20)
    files[1].write_text("w" * 10)
    for f in files:
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    again = corpus_record(files, known)
    assert (again["size"], again["mtime"]) == (known["size"], known["mtime"])
    assert again["md5"] != known["md5"]
    assert corpus_record(files, again) == again  # unchanged: the same


def test_a_changed_file_whose_name_stays_is_seen_and_never_prepared_over_the_old_data(tmp_path):
    """Runs may read the prepared folder: the changed corpus is refused there in one line naming the changed file,
    and prepared into another folder it gets its own fingerprint."""
    files = write_corpus(tmp_path / "c", {"a.txt": "hello world\n" * 20, "b.txt": "other text\n" * 20})
    out = tmp_path / "prepared"
    prepare(tmp_path / "c", out, workers=1, val_fraction=0.4)
    first = json.loads((out / "meta.json").read_text())["fingerprint"]
    files[1].write_text("changed!!!\n" * 20)  # same size
    os.utime(files[1], ns=(files[1].stat().st_mtime_ns + 1, files[1].stat().st_mtime_ns + 1))
    with pytest.raises(UserError, match=f"other inputs or settings \\({files[1]} changed \\(the same size \\(220 "
                       "bytes\\), modified "):
        prepare(tmp_path / "c", out, workers=1, val_fraction=0.4)
    assert json.loads((out / "meta.json").read_text())["fingerprint"] == first
    prepare(tmp_path / "c", tmp_path / "again", workers=1, val_fraction=0.4)
    assert json.loads((tmp_path / "again" / "meta.json").read_text())["fingerprint"] != first


def test_a_touched_corpus_is_prepared_though_an_inputs_json_edited_by_hand_holds_no_rows(tmp_path):
    """Touched, its content the same: the folder is prepared (nothing written), though its inputs.json holds rows
    that are not rows (a file a user may edit is read defensively)."""
    files = write_corpus(tmp_path / "c", {f"{i}.txt": f"document {i}\n" * 20 for i in range(6)})
    out = tmp_path / "prepared"
    prepare(tmp_path / "c", out, workers=1, val_fraction=0.4)
    stamp = (out / "meta.json").stat().st_mtime_ns
    (out / "inputs.json").write_text(json.dumps({"train": [{"path": 1}, "x"], "val": 3}))
    os.utime(files[2], ns=(files[2].stat().st_mtime_ns + 10**9,) * 2)
    assert prepare(tmp_path / "c", out, workers=1, val_fraction=0.4) == out
    assert (out / "meta.json").stat().st_mtime_ns == stamp


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def temp(tmp_path: Path, tag: str, host: str, pid: int, age_s: float = 0) -> Path:
    folder = tmp_path / f".prepared.tmp-{tag}"
    folder.mkdir()
    (folder / OWNER_FILE).write_text(json.dumps({"host": host, "pid": pid}))
    (folder / "part_000000.json").write_text("{}")
    then = time.time() - age_s
    for path in (*folder.iterdir(), folder):
        os.utime(path, (then, then))
    return folder


def test_stale_temp_folders_of_killed_preparations_are_removed_and_live_ones_kept(tmp_path):
    here = socket.gethostname()
    dead_here = temp(tmp_path, "deadhere0000", here, dead_pid())
    live_here = temp(tmp_path, "livehere0000", here, os.getpid(), age_s=2 * STALE_AGE_S)
    fresh_elsewhere = temp(tmp_path, "freshaway000", "another-node", 1)
    old_elsewhere = temp(tmp_path, "oldaway00000", "another-node", 1, age_s=STALE_AGE_S + 60)
    write_corpus(tmp_path / "c", {"a.txt": "some words\n" * 20, "b.txt": "more words\n" * 20})
    prepare(tmp_path / "c", tmp_path / "prepared", workers=1, val_fraction=0.4)
    assert (tmp_path / "prepared" / "meta.json").is_file()
    assert not dead_here.exists() and not old_elsewhere.exists()
    assert live_here.exists() and fresh_elsewhere.exists()


def mapped_files(folder: Path) -> set[str]:
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if line.split()[-1].startswith(str(folder))}


def test_shards_are_mapped_while_read_at_most_max_open_at_once(tmp_path, monkeypatch):
    texts = {f"{i:03d}.txt": f"document {i} " * 30 for i in range(24)}
    write_corpus(tmp_path / "c", texts)
    out = tmp_path / "prepared"
    prepare(tmp_path / "c", out, workers=1, val_fraction=0.1, shard_tokens=64)
    monkeypatch.setattr(loader, "MAX_OPEN_SHARDS", 4, raising=False)
    data = TokenDataset(out, "train")
    shards = read_meta(out)["splits"]["train"]["shards"]
    assert len(shards) > 40
    whole = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16) for s in shards]).astype(np.int64)
    seen = []
    for shard, start in enumerate(data.shard_starts):
        seen.append(data.window(int(start), int(data.shard_sizes[shard])))
        assert len(mapped_files(out)) <= 4
    assert np.array_equal(np.concatenate(seen), whole)


def test_nodes_of_a_preparation_job_share_the_parts_and_write_what_one_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "PART_BYTES", 400)
    monkeypatch.setattr(prepare_module, "POLL_S", 0.05)
    write_corpus(tmp_path / "c", {f"{i:02d}.txt": f"text number {i}, " * 20 for i in range(12)})
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    prepare(tmp_path / "c", alone, workers=1, val_fraction=0.2)
    other = threading.Thread(target=prepare, args=(tmp_path / "c", shared),
                             kwargs=dict(workers=1, val_fraction=0.2, node=1, nodes=2))
    other.start()
    prepare(tmp_path / "c", shared, workers=1, val_fraction=0.2, node=0, nodes=2)
    other.join()
    meta = read_meta(shared)
    assert len(list(shared.glob("part_*.json"))) > 4 and meta["splits"] == read_meta(alone)["splits"]
    for split in meta["splits"].values():
        for s in split["shards"]:
            assert (shared / s["file"]).read_bytes() == (alone / s["file"]).read_bytes()


def test_a_node_that_starts_after_node_0_has_finished_everything_returns(tmp_path, monkeypatch):
    """Twelve small files are one part, so node 0 needs no other node: a node 1 that started late (it found
    nothing prepared yet, then node 0 finished and moved its folder into place) must not wait for a tokenizer that
    will never come."""
    monkeypatch.setattr(prepare_module, "POLL_S", 0.05)
    write_corpus(tmp_path / "c", {f"{i:02d}.txt": f"text number {i}, " * 20 for i in range(12)})
    out = tmp_path / "prepared"
    checks = []

    def node_0_finishes_in_between(*args):
        prepared = is_prepared(*args)
        checks.append(prepared)
        if len(checks) == 1:  # node 1's first look: node 0 runs to the end before node 1 goes on
            prepare(tmp_path / "c", out, workers=1, val_fraction=0.2, node=0, nodes=2)
        return prepared

    is_prepared = prepare_module._is_prepared
    monkeypatch.setattr(prepare_module, "_is_prepared", node_0_finishes_in_between)
    raised = []

    def node_1():
        try:
            prepare(tmp_path / "c", out, workers=1, val_fraction=0.2, node=1, nodes=2)
        except Exception as e:  # noqa: BLE001 - the thread's failure is the test's
            raised.append(e)

    late = threading.Thread(target=node_1, daemon=True)
    late.start()
    late.join(timeout=20)
    assert not late.is_alive(), "node 1 still waits for node 0, which has finished"
    assert not raised, f"node 1 refused the folder node 0 just moved into place: {raised}"
    assert checks[0] is False and read_meta(out)["splits"]["train"]["tokens"] > 0
    assert not list(tmp_path.glob(".prepared.tmp-*")), "node 1 left a temp folder behind"


def test_a_preparation_resumes_only_a_temp_folder_of_its_own_user(tmp_path, monkeypatch):
    """In a data folder others can write in, another user's temp folder (or a link they planted under its name) is
    refused: resuming it would publish parts they chose, or write where they point."""
    from gpt.data.temp_folders import claim

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    planted = tmp_path / ".prepared.tmp-0123456789ab"
    planted.symlink_to(elsewhere)
    with pytest.raises(UserError, match="is a link"):
        claim(planted)
    assert not any(elsewhere.iterdir())
    theirs = tmp_path / ".prepared.tmp-ba9876543210"
    theirs.mkdir()
    me = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: me + 1)  # the folder is then another user's
    with pytest.raises(UserError, match=f"uid {me}'s, not a folder of uid {me + 1}'s"):
        claim(theirs)
    assert not any(theirs.iterdir())
    monkeypatch.undo()
    claim(theirs)  # its own user's: resumed
    assert (theirs / OWNER_FILE).is_file()
