"""The run folder's layout and its attempts log (gpt.run_folder)."""
from __future__ import annotations

import json
from pathlib import Path

from gpt.run_folder import NOT_RUNS, RunFolder


def test_every_file_has_its_place(tmp_path: Path):
    f = RunFolder(tmp_path)
    assert f.config == tmp_path / "config.yaml" and f.lease_beat == tmp_path / "lease.json"
    assert f.log(3) == tmp_path / "logs" / "rank3.log"
    assert f.environment_record(1) == tmp_path / "environment" / "rank1.json"
    assert f.metrics_file(0) == tmp_path / "metrics" / "rank0.jsonl"
    assert f.heartbeat(2) == tmp_path / "watchdog" / "rank2.json"
    assert f.hang_report(4) == (tmp_path / "hang-4.json", tmp_path / "hang-4.txt")
    assert f.health_record(2) == tmp_path / "health-2.json"
    assert f.scaling_board == tmp_path / "tensorboard" / "scaling"
    assert set(NOT_RUNS) == {"report", "tensorboard", ".hydra", "checkpoints", "logs"}


def test_records_are_listed_in_rank_and_attempt_order(tmp_path: Path):
    f = RunFolder(tmp_path)
    f.environment.mkdir()
    for rank in (1, 0):
        f.environment_record(rank).write_text("{}")
    f.rendezvous.write_text("{}")  # not a rank's record
    for attempt in (10, 2, 9):
        f.health_record(attempt).write_text("{}")
    assert [p.name for p in f.environment_records()] == ["rank0.json", "rank1.json"]
    assert [p.name for p in f.health_records()] == ["health-2.json", "health-9.json", "health-10.json"]


def test_a_run_folder_is_a_config_next_to_metrics(tmp_path: Path):
    f = RunFolder(tmp_path)
    f.config.write_text("seed: 1\n")
    assert not f.is_run()
    f.metrics.mkdir()
    assert f.is_run()


def test_the_attempts_log_round_trips_and_stamps_each_line(tmp_path: Path):
    log = RunFolder(tmp_path).attempts
    assert log.read() == [] and log.line_of("7", 0) is None
    log.append("7", 0, {"ended": "preempted:SIGTERM", "requeued": True})
    log.append("7", 1, {"ended": "finished"})
    first, second = log.read()
    assert first.job_id == "7" and first.restart == 0 and first.requeued and first.time > 0
    assert log.line_of("7", 1) == second and log.line_of("8", 0) is None
    assert log.line_of(None, 0) is None  # no scheduler: no job id to find its line by


def test_launches_that_share_one_job_keep_their_own_attempts(tmp_path: Path):
    """Two launches inside one salloc share the job id and restart 0: each has its own line, claim and key, and a
    line written before launches had ids is still the job's own."""
    log = RunFolder(tmp_path).attempts
    log.append("7", 0, {"ended": "finished"})  # the job's own launch (sbatch), as before
    key = log.key("7", 0, None, 0, "L1")
    assert key != log.key("7", 0, None, 0, "L2") and key != log.key("7", 0, None) == "job7-restart0"
    assert log.append_once(key, "7", 0, {"ended": "hang", "in_job_restart": 1}, 0, "L1")
    assert log.append_once(log.key("7", 0, None, 0, "L2"), "7", 0, {"ended": "finished"}, 0, "L2")
    assert log.line_of("7", 0).launch == "" and log.line_of("7", 0, 0, "L1").in_job_restart == 1
    assert log.line_of("7", 0, 0, "L2").finished and log.line_of("7", 0, 0, "L3") is None
    third = log.key("7", 0, None, 0, "L3")
    assert not log.claim(key) and log.claim(third) and not log.claim(third)


def test_a_line_cut_short_is_skipped(tmp_path: Path):
    log = RunFolder(tmp_path).attempts
    log.append(None, 0, {"ended": "finished"})
    with open(log.log, "a") as f:
        f.write('{"job_id": null, "restart": 0, "ended": "fin')  # a writer killed mid-line
    assert [a.ended for a in log.read()] == ["finished"]


def test_an_old_line_reads_through_the_typed_record(tmp_path: Path):
    """A line written before in-job restarts and the typed record (no round, no nodes, a key the record does not
    name) reads with the defaults, and the outcome it records."""
    from gpt.run_folder import AttemptLine, Next

    old = {"job_id": "7", "restart": 1, "time": 5.0, "first_step": 10, "last_step": 20, "ended": "hang",
           "requeued": True, "note": "requeued job 7", "hang": "rank 1 is gone", "goodput": {"allocated_s": 3.0}}
    (tmp_path / "attempts.jsonl").write_text(json.dumps(old) + "\n")
    (line,) = RunFolder(tmp_path).attempts.read()
    assert (line.round, line.nodes, line.in_job_restart, line.lost_rank, line.next) == (0, (), 0, None, Next.REQUEUE)
    assert line.extra == {"hang": "rank 1 is gone"} and line.goodput == {"allocated_s": 3.0}
    assert line == AttemptLine.from_json(old) and line.of("7", 1) and not line.of("7", 1, 1)
    nodes = AttemptLine.from_json({"nodes": ["n1"], "in_job_restart": 2, "requeued": False, "lost_rank": 0})
    assert (nodes.nodes, nodes.next, nodes.lost_rank) == (("n1",), Next.RESTART, 0)
    assert AttemptLine.from_json({"next_link": "9"}).next is Next.NEXT_LINK
    assert AttemptLine.from_json({"ended": "finished"}).next is Next.STOP


def test_the_mark_of_the_attempt_in_flight(tmp_path: Path):
    log = RunFolder(tmp_path).attempts
    assert log.read_mark() is None
    log.mark({"job_id": "7", "restart": 1, "started": 5.0, "first_step": 10})
    assert json.loads(log.in_flight.read_text())["first_step"] == 10 and log.read_mark()["restart"] == 1
    log.unmark(log.key("7", 0, None))  # another attempt's: the mark stays
    assert log.read_mark() is not None
    log.unmark(log.key("7", 1, None))
    log.unmark(log.key("7", 1, None))  # once gone, it stays gone
    assert not log.in_flight.exists()
    log.in_flight.write_text("{")  # torn: as if there were none
    assert log.read_mark() is None


def test_an_attempts_line_has_one_writer(tmp_path: Path):
    """Every rank of a node killed at once: each task tries to record the attempt; one line is written."""
    log = RunFolder(tmp_path).attempts
    wrote = [log.append_once(log.key("7", 1, None), "7", 1, {"ended": f"rank {r} lost"}) for r in range(4)]
    assert wrote == [True, False, False, False] and len(log.read()) == 1
    assert log.append_once(log.key(None, 0, 3), None, 0, {"ended": "finished"})  # a local run: by its lease
    assert not log.append_once(log.key(None, 0, 3), None, 0, {"ended": "finished"})
    assert log.append_once(log.key(None, 0, 4), None, 0, {"ended": "finished"}) and len(log.read()) == 3


def test_an_attempt_after_one_killed_outright_has_a_number_of_its_own(tmp_path: Path):
    """An attempt killed outright (kill -9 of the job) leaves its mark and no line; the next attempt writes that line
    later. Counted by lines alone, the next one took the killed one's number, and its profiles
    (profiles/attempt-N/) and health figures (health-N.json) overwrote the killed one's."""
    folder = RunFolder(tmp_path)
    log = folder.attempts
    assert log.next_number() == 1
    log.mark({"job_id": "7", "restart": 0, "round": 0, "generation": 1})  # job 7's attempt 1, in flight: ends well
    log.append("7", 0, {"ended": "finished"})
    log.unmark(log.key("7", 0, 1))
    log.mark({"job_id": "8", "restart": 0, "round": 0, "generation": 2})  # job 8's attempt: killed outright
    assert log.next_number() == 3  # job 9's: the second line will be job 8's, written by job 9
    assert folder.profile_trace(3, 0) != folder.profile_trace(2, 0)
    log.append("8", 0, {"ended": "killed"})  # job 9 writes job 8's line; the mark stays until 9 marks itself
    assert log.next_number() == 3  # counted once
    log.mark({"job_id": None, "restart": 0, "generation": 3})  # without a scheduler, a mark is an attempt's own
    assert log.next_number() == 4
