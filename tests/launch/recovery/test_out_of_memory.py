"""A rank out of device memory (launch.recovery.out_of_memory): the one decision goes on with a smaller micro-batch and
the same global batch, recorded in the run's config.yaml and the attempt's line, down to micro-batch 1, where it
stops with what needs less memory; and a later launch of the same command keeps the smaller micro-batch."""
from __future__ import annotations

import json
import logging

import pytest

from gpt.config import schema
from gpt.run_folder import Next, RunFolder
from helpers import compose, plan
from launch import launch_config
from launch.rank.job_env import ROUND_VAR
from launch.recovery.decision import Cause, Ending, recover
from launch.recovery.out_of_memory import RanOut, kept_micro_batch
from test_recovery import Scheduler


def ran_out(micro: int, accumulation: int, rank: int = 1, step: int = 12, **kw) -> dict:
    """A rank's record as its attempt's ending carries it (launch.recovery.endings)."""
    return RanOut.of({"rank": rank, "host": "n2", "step": step, "micro_batch": micro, "accumulation": accumulation,
            "global_batch": micro * accumulation * 2, "activation_checkpointing": "none",
            "error": "CUDA out of memory. Tried to allocate 2.00 GiB", **kw}).record()


def end_with(run_dir, job, record: dict) -> Ending:
    return Ending(run_dir, job, Cause.OUT_OF_MEMORY, "out of memory", 5,
                  record={"first_step": 10, "last_step": 12, "out_of_memory": record})


def micro_in_config(run_dir) -> int:
    return launch_config.load(RunFolder(run_dir).config).train.micro_batch_size


@pytest.fixture
def run_dir(tmp_path):
    schema.save(launch_config.parse(compose("train.global_batch_size=32", "train.micro_batch_size=8")),
                tmp_path / "config.yaml")
    return tmp_path


def test_half_the_micro_batch_in_the_next_round_the_same_global_batch_said_in_one_line(run_dir):
    job = Scheduler(environ={ROUND_VAR: "0"})
    got = recover(end_with(run_dir, job, ran_out(8, 2)))
    assert got.next is Next.RESTART and job.asked == []
    assert got.note == ("rank 1 ran out of device memory at step 12 with micro-batch 8: the next round trains with "
                        "micro-batch 4 and accumulation 4, the same global batch 32; restarting inside the allocation "
                        "(in-job restart 1 of at most 3)")
    assert micro_in_config(run_dir) == 4  # what the next round's ranks read
    (line,) = RunFolder(run_dir).attempts.read()
    assert (line.ended, line.in_job_restart, line.note) == ("out of memory", 1, got.note)
    assert {k: line.out_of_memory[k] for k in ("rank", "step", "micro_batch", "next_micro_batch", "accumulation",
                                               "next_accumulation", "global_batch")} == \
        {"rank": 1, "step": 12, "micro_batch": 8, "next_micro_batch": 4, "accumulation": 2, "next_accumulation": 4,
         "global_batch": 32}
    assert json.loads((run_dir / "rounds" / "job77-restart0" / "round-1.json").read_text())["round"] == 1


def test_an_out_of_memory_that_repeats_halves_again_down_to_1_then_stops_with_the_hint(run_dir):
    """Requeued each time (no round here): 8, 4, 2, then at 1 the run stops, however many checkpoints (none) it
    saved meanwhile: the micro-batch bounds it, not progress."""
    notes = []
    for restart, (micro, accumulation) in enumerate([(8, 2), (4, 4), (2, 8)]):
        job = Scheduler(restart=restart)
        got = recover(end_with(run_dir, job, ran_out(micro, accumulation)))
        assert (got.next, job.asked, micro_in_config(run_dir)) == (Next.REQUEUE, [("requeue",)], micro // 2)
        notes.append(got.note.split(";")[0].split(": ", 1)[1])
    assert notes == [f"the requeued job trains with micro-batch {m} and accumulation {a}, the same global batch 32"
                     for m, a in [(4, 4), (2, 8), (1, 16)]]
    job = Scheduler(restart=3)
    stop = recover(end_with(run_dir, job, ran_out(1, 16)))
    assert stop.next is Next.STOP and job.asked == [] and micro_in_config(run_dir) == 1
    assert stop.note == ("rank 1 ran out of device memory at step 12 with micro-batch 1 (CUDA out of memory. Tried to "
                         "allocate 2.00 GiB); run again with profile.memory_snapshot=true to see what held it; "
                         "train.activation_checkpointing=full or strategy=fsdp needs less")
    snapshot = RanOut.of(ran_out(1, 16, snapshot="/runs/r/profiles/attempt-4/rank1-memory-oom.pickle")).stop()
    assert "its memory snapshot is /runs/r/profiles/attempt-4/rank1-memory-oom.pickle" in snapshot
    assert [a.out_of_memory["micro_batch"] for a in RunFolder(run_dir).attempts.read()] == [8, 4, 2, 1]


def test_an_odd_micro_batch_shrinks_to_its_largest_divisor_the_global_batch_exact():
    assert [(RanOut.of(ran_out(m, a)).next_micro_batch, RanOut.of(ran_out(m, a)).next_accumulation)
            for m, a in [(6, 1), (3, 2), (9, 1), (7, 1)]] == [(3, 2), (1, 6), (3, 3), (1, 7)]


def test_without_a_round_or_a_requeue_the_same_command_continues_with_the_smaller_micro_batch(run_dir):
    job = Scheduler(grants=False)
    got = recover(end_with(run_dir, job, ran_out(8, 2)))
    assert got.next is Next.STOP and micro_in_config(run_dir) == 4
    assert got.note.startswith("rank 1 ran out of device memory at step 12 with micro-batch 8: the same command trains "
                               "with micro-batch 4 and accumulation 4, the same global batch 32; restart limit reached")


def test_a_later_launch_keeps_the_smaller_micro_batch_unless_asked_for_another(run_dir):
    attempts = RunFolder(run_dir).attempts
    for micro, accumulation in [(8, 2), (4, 4)]:
        attempts.append("77", 0, {"ended": "out of memory", "out_of_memory": ran_out(micro, accumulation)})
    lines = attempts.read()
    assert kept_micro_batch(lines, 8, "none")[0] == 2 and kept_micro_batch(lines, 4, "none")[0] == 2
    assert "train.micro_batch_size=2 kept" in kept_micro_batch(lines, 8, "none")[1]
    assert kept_micro_batch(lines, 16, "none") == (16, "")  # another size, asked for explicitly
    assert kept_micro_batch(lines, 1, "none") == (1, "")
    assert kept_micro_batch(lines, 8, "full") == (8, "")  # activation checkpointing changes what fits
    assert kept_micro_batch([], 8, "none") == (8, "")


def test_planning_the_same_command_again_keeps_the_recorded_micro_batch_and_says_so(tmp_path, prepared_data, caplog):
    command = ["model=tiny", "train.global_batch_size=32", "train.micro_batch_size=8", *prepared_data]
    plan(tmp_path, *command)
    RunFolder(tmp_path).attempts.append(None, 0, {"ended": "out of memory", "out_of_memory": ran_out(8, 4, rank=0)})
    with caplog.at_level(logging.INFO, logger="launch.recovery.out_of_memory"):
        plan(tmp_path, *command)
    assert micro_in_config(tmp_path) == 4
    assert [r.getMessage() for r in caplog.records if r.name == "launch.recovery.out_of_memory"] == [
        "train.micro_batch_size=4 kept, the same global batch: this run ran out of device memory with micro-batch 8 "
        "(rank 0, step 12); another train.micro_batch_size on the command is taken as asked"]
    plan(tmp_path, *command[:-len(prepared_data) - 1], "train.micro_batch_size=2", *prepared_data)
    assert micro_in_config(tmp_path) == 2
