"""A resumed run's metrics read as one continuous run, on every rank's file, also the ranks an earlier attempt had
and this one does not (a resume on fewer ranks)."""
from __future__ import annotations

import itertools
import json

import pytest

from gpt.run_folder import STEP_COUNTS, in_steps_done
from gpt.train import event_file
from gpt.train.metrics import MetricsWriter


def kept_steps(folder, ranks) -> dict[int, list[int]]:
    return {rank: [json.loads(x)["step"] for x in (folder / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in ranks}


def test_a_resume_on_fewer_ranks_drops_the_gone_ranks_records_past_the_resume_step(tmp_path):
    (tmp_path / "metrics").mkdir()
    for rank in range(4):  # an earlier attempt on 4 ranks trained to step 10, its checkpoint is at step 5
        (tmp_path / "metrics" / f"rank{rank}.jsonl").write_text("".join(
            json.dumps({"kind": "train", "step": s, STEP_COUNTS: "done", "rank": rank}) + "\n" for s in range(1, 11)))
    writers = [MetricsWriter(tmp_path, rank, "h", resume_step=5, world_size=2) for rank in (1, 0)]
    for w in writers:
        w.close()
    assert kept_steps(tmp_path, range(4)) == {rank: [1, 2, 3, 4, 5] for rank in range(4)}  # step 5's is the checkpoint's


def test_a_resume_keeps_an_older_folders_records_of_the_steps_its_checkpoint_holds(tmp_path):
    """Records written before they said how they count steps: a train record's step was its step's index, from 0; a
    validation record's the steps done. Those of the 5 steps step_00000005 holds stay, as they were written."""
    (tmp_path / "metrics").mkdir()
    old = [{"kind": "train", "step": s} for s in range(10)] + [{"kind": "val", "step": 5}, {"kind": "val", "step": 10}]
    (tmp_path / "metrics" / "rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    MetricsWriter(tmp_path, 0, "h", resume_step=5, world_size=1).close()
    kept = [json.loads(x) for x in (tmp_path / "metrics" / "rank0.jsonl").read_text().splitlines()]
    assert kept == [{"kind": "train", "step": s} for s in range(5)] + [{"kind": "val", "step": 5}]
    assert [in_steps_done(r)["step"] for r in kept] == [1, 2, 3, 4, 5, 5]


@pytest.mark.parametrize("serial", [0, 8], ids=["first-files", "past-the-9th-file"])
def test_tensorboard_reads_a_resumed_run_as_one_run_on_every_rank(tmp_path, monkeypatch, serial):
    """TensorBoard drops an earlier attempt's events from the resume step on (its purge marker), on the ranks that
    write again and on those a resume on fewer ranks leaves behind; also when every file is of one second and the
    process had written files before (the purge's file must still sort after those it purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(event_file, "_serial", itertools.count(serial))
    monkeypatch.setattr(event_file.time, "time", lambda: 1_800_000_000.0)

    for rank in range(2):  # the earlier attempt: steps 1-10 on 2 ranks, its checkpoint at step 5
        first = MetricsWriter(tmp_path, rank, "h", resume_step=0, world_size=2)
        for step in range(1, 11):
            first.write(step, {"loss": 1.0})
        first.close()
    again = MetricsWriter(tmp_path, 0, "h", resume_step=5, world_size=1)
    for step in range(6, 9):
        again.write(step, {"loss": 2.0})
    again.close()
    curves = {}
    for rank in range(2):
        events = EventAccumulator(str(tmp_path / "tensorboard" / f"rank{rank}"))
        events.Reload()
        curves[rank] = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert curves[0] == [(s, 1.0) for s in range(1, 6)] + [(s, 2.0) for s in range(6, 9)]
    assert curves[1] == [(s, 1.0) for s in range(1, 6)]
