"""A resumed run's metrics read as one continuous run, on every rank's file, also the ranks an earlier attempt had
and this one does not (a resume on fewer ranks)."""
from __future__ import annotations

import json

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
