"""Heartbeats cost the shared file system at most one metadata operation per node per beat, whatever the number of
ranks per node (counted with inotify on a real folder), and a node's writer that falls silent is replaced. The
node's folder in memory is the user's alone, under a name another user cannot guess."""
from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from control_counters import FsOps
from gpt.errors import UserError
from gpt.config.sections import WatchdogConfig
from gpt.run_folder import RunFolder
from launch.recovery.heartbeat import read_heartbeats
from launch.recovery import node_heartbeat
from launch.recovery.node_heartbeat import NodeHeartbeat, node_local_dir
from launch.recovery.watchdog import Watchdog


def test_four_ranks_of_a_node_cost_the_run_folder_at_most_one_metadata_operation_per_beat(tmp_path):
    (tmp_path / "watchdog").mkdir()
    dogs = [Watchdog(WatchdogConfig(), tmp_path, r, 4, "n1", 1, lambda report: False) for r in range(4)]
    earlier = node_local_dir(tmp_path, "n1") / "rank5.json"  # a rank of an earlier attempt, killed
    earlier.parent.parent.mkdir(mode=0o700)  # as the earlier attempt made it: this user's alone
    earlier.parent.mkdir()
    earlier.write_text('{"attempt": 0, "restart": 0, "generation": null}')
    with FsOps(tmp_path) as ops:
        for dog in dogs:  # the first beats create the node's record
            dog.beat()
        since = time.time()
        for _ in range(10):
            for dog in dogs:
                dog.beat()
        until = time.time()
        time.sleep(0.3)  # inotify's events are read by a thread
    window = ops.by_path(since, until)
    assert sum(window.values()) <= 10, window  # one per node per beat at most (it was 2 per rank: 80)
    beats = read_heartbeats(tmp_path, 4, 1)
    assert [b["beat"] for b in beats] == [11, 10, 10, 10], beats  # the writer's peers: as of its last beat
    for dog in dogs:
        dog.end("finished")
    assert [b["ended"] for b in read_heartbeats(tmp_path, 4, 1)] == ["finished"] * 4
    last = read_heartbeats(tmp_path, 4, 1)[0]["beat"]
    dogs[0].beat()  # an ended rank beats on until it exits: a survivor reporting its peers' loss must not look gone
    beat = read_heartbeats(tmp_path, 4, 1)[0]
    assert (beat["beat"], beat["ended"]) == (last + 1, "finished"), beat
    assert not earlier.exists()  # the node's memory holds this attempt's beats only


def test_a_silent_writer_is_replaced_and_reads_as_silent_while_its_node_beats_on(tmp_path):
    (tmp_path / "watchdog").mkdir()
    interval = 0.05
    writer, other = (NodeHeartbeat(tmp_path, "n1", r, interval) for r in (0, 1))
    record = {"attempt": 1, "restart": 0, "generation": None}
    writer.beat({**record, "rank": 0, "beat": 1})  # then it is killed, or frozen
    for n in range(1, 30):
        other.beat({**record, "rank": 1, "beat": n})
        time.sleep(interval)
    beats = read_heartbeats(tmp_path, 2, 1)
    assert beats[0]["beat"] == 1 and beats[1]["beat"] == 29, beats  # rank 1 took over the node's record


def test_a_survivor_reads_its_peers_from_their_node_records(tmp_path):
    """A rank SIGABRT ended looks for the peer to blame among the heartbeats of its attempt: a lost peer's is in
    its node's record only (it never wrote its own file)."""
    from launch.recovery.lost import _peers

    (tmp_path / "watchdog").mkdir()
    record = {"attempt": 1, "restart": 0, "generation": None, "time": time.time()}
    for rank, host in ((0, "n1"), (1, "n2")):
        NodeHeartbeat(tmp_path, host, rank, 1.0).beat({**record, "rank": rank, "host": host, "beat": 3})
    assert list(_peers(tmp_path, 0)) == [1]


def test_a_new_attempts_shorter_record_replaces_a_longer_one_whole(tmp_path):
    (tmp_path / "watchdog").mkdir()
    record = tmp_path / "watchdog" / "node-n1.json"
    record.write_text('{"host": "n1", "ranks": {}}' + " " * 4000 + '{"earlier": "a longer record"}')
    NodeHeartbeat(tmp_path, "n1", 0, 1.0).beat({"rank": 0, "attempt": 2, "restart": 1, "generation": None,
                                                "beat": 1})
    assert [b["beat"] for b in read_heartbeats(tmp_path, 1, 2)] == [1]  # the record parses: no tail of the old one


def test_ranks_that_exit_leave_nothing_in_the_nodes_memory(tmp_path):
    (tmp_path / "watchdog").mkdir()
    dogs = [Watchdog(WatchdogConfig(), tmp_path, r, 2, "n1", 1, lambda report: False) for r in range(2)]
    for dog in dogs:
        dog.beat()
    local = node_local_dir(tmp_path, "n1")
    assert sorted(p.name for p in local.iterdir()) == ["rank0.json", "rank1.json"]
    dogs[0].end("finished")
    dogs[0].close()
    dogs[0].beat()  # its watchdog thread may beat once more: nothing comes back
    assert [p.name for p in local.iterdir()] == ["rank1.json"]
    dogs[1].beat()  # rank 1 takes over as the node's writer
    assert read_heartbeats(tmp_path, 2, 1)[1]["beat"] == 2
    dogs[1].end("finished")
    dogs[1].close()
    assert not local.parent.exists(), list(local.parent.rglob("*"))
    assert [b["ended"] for b in read_heartbeats(tmp_path, 2, 1)] == ["finished"] * 2


def test_the_nodes_folder_is_private_and_named_after_the_runs_secret(tmp_path):
    (tmp_path / "watchdog").mkdir()
    NodeHeartbeat(tmp_path, "n1", 0, 1.0).beat({"rank": 0, "attempt": 1, "restart": 0, "generation": None})
    local = node_local_dir(tmp_path, "n1")
    secret = tmp_path / "watchdog" / "node-secret"
    try:
        assert stat.S_IMODE(local.parent.stat().st_mode) == 0o700 and local.parent.stat().st_uid == os.getuid()
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert len(secret.read_text()) >= 32 and secret.read_text() not in str(local)
        assert node_local_dir(tmp_path, "n1") == local  # every rank of the run finds the same folder
        secret.write_text("another secret")
        assert node_local_dir(tmp_path, "n1") != local  # the run folder's path alone does not name it
    finally:
        shutil.rmtree(local.parent)


def _made_by_another_user(folder, monkeypatch) -> None:
    if os.geteuid() == 0:
        os.chown(folder, 4242, 4242)
    else:  # not root: this process takes another uid than the folder's owner
        monkeypatch.setattr(os, "getuid", lambda: os.stat(folder).st_uid + 1)


@pytest.mark.parametrize("how", ["another owner", "open to all"])
def test_a_nodes_folder_another_user_could_write_in_is_refused(tmp_path, monkeypatch, how):
    (tmp_path / "watchdog").mkdir()
    beats = NodeHeartbeat(tmp_path, "n1", 0, 1.0)
    folder = beats.local.parent
    folder.mkdir(mode=0o700)  # there before the run: on a shared node, made by another user
    try:
        if how == "another owner":
            _made_by_another_user(folder, monkeypatch)
        else:
            folder.chmod(0o777)
        with pytest.raises(UserError, match=f"{folder} belongs to uid .* another user could stop or fool"):
            beats.beat({"rank": 0, "attempt": 1, "restart": 0, "generation": None})
        assert list(folder.iterdir()) == []  # no beat went into it
        assert not (tmp_path / "watchdog" / "node-n1.json").exists()
    finally:
        monkeypatch.undo()
        shutil.rmtree(folder)


def test_a_secret_another_user_owns_is_refused(tmp_path, monkeypatch):
    secret = tmp_path / "watchdog" / "node-secret"
    secret.parent.mkdir()
    secret.write_text("0" * 32)
    secret.chmod(0o600)
    _made_by_another_user(secret, monkeypatch)
    with pytest.raises(UserError, match="node-secret belongs to uid"):
        NodeHeartbeat(tmp_path, "n1", 0, 1.0)


def test_a_peers_beat_after_its_fence_stays_through_a_beat_from_before_the_writers(tmp_path):
    """Rank 1 fences its writes (generation 1), beats and dies before its next beat; rank 0, the node's writer, beats
    once more before its own fence, then after it. Rank 1's beat stays in the node's record, where its survivors
    look for the lost. An earlier generation's beat still goes."""
    (tmp_path / "watchdog").mkdir()
    record = {"attempt": 1, "restart": 0, "time": time.time(), "host": "n1"}
    writer, dying = NodeHeartbeat(tmp_path, "n1", 0, 1.0), NodeHeartbeat(tmp_path, "n1", 1, 1.0)
    dying.beat({**record, "rank": 1, "beat": 2, "generation": 1})
    writer.beat({**record, "rank": 0, "beat": 2, "generation": None})
    writer.beat({**record, "rank": 0, "beat": 3, "generation": 1})
    assert read_heartbeats(tmp_path, 2, 1)[1]["beat"] == 2
    writer.beat({**record, "rank": 0, "beat": 4, "generation": 2})  # a later launch took the folder over
    assert read_heartbeats(tmp_path, 2, 1)[1] is None


def test_a_rank_starting_on_a_node_removes_this_users_folders_silent_for_a_day_and_nothing_else(tmp_path,
                                                                                                monkeypatch):
    """A killed rank's folder on a node its run never came back to stays in node memory unless a later rank clears
    it: one silent for STALE_LOCAL_S goes; a fresh one, a link, a folder another gptlaunch part names alike (the
    local rank servers' /tmp/gptlaunch-rank-start-*) and other names stay."""
    base = tmp_path / "shm"
    base.mkdir()
    now = 1_800_000_000.0
    def folder(name: str, age_s: float) -> Path:
        path = base / name / "n1"
        path.mkdir(parents=True)
        (path / "rank1.json").write_text("{}")
        for p in (path / "rank1.json", path, path.parent):
            os.utime(p, (now - age_s, now - age_s))
        return path.parent
    stale = folder("gptlaunch-" + "a" * 32, node_heartbeat.STALE_LOCAL_S + 60)
    fresh = folder("gptlaunch-" + "b" * 32, node_heartbeat.STALE_LOCAL_S - 60)
    server = folder("gptlaunch-rank-start-forkserver-x1", node_heartbeat.STALE_LOCAL_S * 3)
    other = folder("something-else", node_heartbeat.STALE_LOCAL_S * 3)
    link = base / ("gptlaunch-" + "c" * 32)
    link.symlink_to(other)
    assert node_heartbeat.sweep_stale(base, now) == [stale]
    assert not stale.exists() and all(p.exists() for p in (fresh, server, other, link))

    # a rank's heartbeat sweeps its node's folder when it starts
    swept = []
    monkeypatch.setattr(node_heartbeat, "sweep_stale", lambda where, when: swept.append(where))
    (tmp_path / "run" / "watchdog").mkdir(parents=True)
    NodeHeartbeat(tmp_path / "run", "n1", 0, 1.0)
    assert swept == [node_local_dir(tmp_path / "run", "n1").parent.parent]


def test_stray_files_in_the_watchdog_folder_are_skipped_not_fatal(tmp_path, caplog):
    """A copy a user made (rank0-copy.json), a node record that is a list, a rank file with a garbled count: the
    peers' watchdogs read this folder while a rank is stuck, and must still name it."""
    from launch.recovery.heartbeat import all_heartbeats

    folder = RunFolder(tmp_path).watchdog
    folder.mkdir(parents=True)
    good = {"rank": 1, "attempt": 0, "restart": 0, "beat": 3, "time": 1.0}
    (folder / "rank1.json").write_text(json.dumps(good))
    (folder / "rank0-copy.json").write_text(json.dumps({**good, "rank": 0}))
    (folder / "node-x.json").write_text("[1, 2]")
    (folder / "node-y.json").write_text(json.dumps({"ranks": {"two": good}}))
    (folder / "rank2.json").write_text(json.dumps({**good, "beat": "many"}))
    with caplog.at_level("WARNING", logger="launch.recovery.heartbeat"):
        assert all_heartbeats(tmp_path) == {1: good}
        assert all_heartbeats(tmp_path) == {1: good}
    named = [r.getMessage() for r in caplog.records]
    assert len(named) == 3 and all("is not a heartbeat record" in m for m in named), named


def test_the_stuck_ranks_of_a_node_read_their_peers_once_per_interval_between_them(tmp_path, monkeypatch):
    """8 ranks on 2 nodes, all stuck: each interval the run folder's heartbeat records are read (and the hang report
    looked for) once per node, not once per rank (8 each: 2,048 ranks on 256 nodes read 256 files each, every
    second), and every rank still sees every peer's beat and another rank's report."""
    from launch.recovery import peer_view, watchdog
    from launch.recovery.hang import HangReport

    (tmp_path / "watchdog").mkdir()
    dogs = [Watchdog(WatchdogConfig(interval_s=1), tmp_path, r, 8, f"n{r // 4}", 1, lambda report: False)
            for r in range(8)]
    for dog in dogs * 2:  # the second time round, each node's writer publishes its peers' first beats
        dog.beat()
    reads, looks, clock = [], [], [1000.0]
    real_read, real_look = watchdog.read_heartbeats, HangReport.reported_elsewhere
    monkeypatch.setattr(watchdog, "read_heartbeats", lambda *a, **k: (reads.append(a), real_read(*a, **k))[1])
    monkeypatch.setattr(HangReport, "reported_elsewhere", lambda self: (looks.append(self), real_look(self))[1])
    monkeypatch.setattr(peer_view.time, "monotonic", lambda: clock[0])
    for _ in range(5):
        clock[0] += 1.0  # an interval on
        seen = [dog.shared_peers() for dog in dogs]
    assert len(reads) == len(looks) == 5 * 2  # before: 5 * 8
    beats = [b["beat"] for b in read_heartbeats(tmp_path, 8, 1)]
    assert all([b["beat"] for b in got] == beats and not reported for got, reported in seen)
    assert all(dog.liveness.silent_s(5) is not None for dog in dogs)  # every rank's liveness record is fed
    RunFolder(tmp_path).hang_report(1)[0].write_text("")  # another rank claimed the report
    assert not any(dog.shared_peers()[1] for dog in dogs)  # each node's copy is of this interval still
    clock[0] += 1.0
    assert all(dog.shared_peers()[1] for dog in dogs)  # found within an interval
    for dog in dogs:
        dog.close()
    assert not node_local_dir(tmp_path, "n0").parent.exists()  # the node's shared copy went with its last rank
