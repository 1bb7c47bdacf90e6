"""A resumed run's metrics read as one continuous run, on every rank's file, also the ranks an earlier attempt had
and this one does not (a resume on fewer ranks)."""
from __future__ import annotations

import itertools
import json

import pytest

from gpt.train import event_file
from gpt.train.metrics import MetricsWriter


def test_a_resume_on_fewer_ranks_drops_the_gone_ranks_records_past_the_resume_step(tmp_path):
    (tmp_path / "metrics").mkdir()
    for rank in range(4):  # an earlier attempt on 4 ranks trained to step 10, its checkpoint is at step 5
        (tmp_path / "metrics" / f"rank{rank}.jsonl").write_text(
            "".join(json.dumps({"kind": "train", "step": s, "rank": rank}) + "\n" for s in range(1, 11)))
    writers = [MetricsWriter(tmp_path, rank, "h", resume_step=5, world_size=2) for rank in (1, 0)]
    for w in writers:
        w.close()
    steps = {rank: [json.loads(x)["step"] for x in (tmp_path / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()]
             for rank in range(4)}
    assert steps == {rank: [1, 2, 3, 4] for rank in range(4)}


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
    for step in range(5, 9):
        again.write(step, {"loss": 2.0})
    again.close()
    curves = {}
    for rank in range(2):
        events = EventAccumulator(str(tmp_path / "tensorboard" / f"rank{rank}"))
        events.Reload()
        curves[rank] = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert curves[0] == [(s, 1.0) for s in range(1, 5)] + [(s, 2.0) for s in range(5, 9)]
    assert curves[1] == [(s, 1.0) for s in range(1, 5)]
