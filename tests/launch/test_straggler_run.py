"""Straggler detection inside real training: a delay injected on one rank makes that rank, and its host, a
straggler in rank 0's records; without it no rank is one. Under layouts whose collectives run inside forward and
backward (FSDP, tensor parallel, pipeline) the peers wait for the slow rank there, and the compute probe finds it."""
from __future__ import annotations

import json

import pytest

from helpers import launch, read_metrics

RUN = ["model=tiny", "strategy=ddp", "cluster.tasks_per_node=2", "train.max_steps=30", "train.log_interval=5",
       "train.eval_interval=0", "train.layer_grad_norms=false", "stragglers.windows=2"]


@pytest.mark.slow
@pytest.mark.parametrize("delayed", [True, False], ids=["delay-on-rank-1", "no-delay"])
def test_injected_delay_makes_a_straggler(delayed, tmp_path, data_overrides):
    """With a noise floor (stragglers.min_excess_s, as on a shared machine): the other tests' load slowed a
    rank of the control past the 20% threshold for two windows, by milliseconds a step."""
    delay = ["debug.delay_rank=1", "debug.delay_s=0.3"] if delayed else []  # 2x the bound below: a burst of load
    launch(*RUN, *data_overrides, *delay, "stragglers.min_excess_s=0.05", run_dir=tmp_path)
    records = read_metrics(tmp_path, rank=0)
    counts = [r["stragglers/count"] for r in records]
    log = (tmp_path / "logs" / "rank0.log").read_text()
    if delayed:
        assert counts[-1] == 1, counts
        assert records[-1]["rank_busy_s/rank1"] > records[-1]["rank_busy_s/rank0"] + 0.1  # wall time is shared
        assert "rank 1" in log and "straggler" in log
    else:
        assert max(counts) == 0, counts
        assert "straggler" not in log


# Collectives inside forward/backward: the fast rank waits in FSDP's all-gathers, the tensor-parallel all-reduces,
# the pipeline's receives. The slow rank is the pipeline's last stage, without the token embedding.
HIDDEN = {"fsdp": ["strategy=fsdp"], "tp": ["strategy=fsdp", "parallel.tp=2"],
          "pipeline": ["strategy=pipeline", "strategy.microbatches=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("layout", HIDDEN)
def test_a_slow_rank_is_found_where_its_peers_wait_inside_forward_and_backward(layout, tmp_path, data_overrides):
    run = [o for o in RUN if not o.startswith(("strategy=", "train.max_steps"))]
    launch(*run, *HIDDEN[layout], "train.max_steps=20", *data_overrides, "debug.delay_rank=1", "debug.delay_s=0.1",
           run_dir=tmp_path)
    records = read_metrics(tmp_path, rank=0)
    assert records[-1]["stragglers/count"] == 1, [r["stragglers/count"] for r in records]
    last = records[-1]
    assert last["rank_busy_s/rank1"] > last["rank_busy_s/rank0"] + 0.05, last
    assert "rank 1" in (tmp_path / "logs" / "rank0.log").read_text()
    assert last["hidden_wait_s"] > 0.05 and last["comm_s"] >= last["hidden_wait_s"], last  # rank 0's wait: comm


@pytest.mark.slow
def test_excluding_a_straggler_that_does_not_pay_keeps_it_and_says_why(tmp_path, data_overrides):
    launch(*RUN, *data_overrides, "debug.straggler_rank=1", "debug.straggler_s=0.15",
           "stragglers.action=exclude", run_dir=tmp_path)  # 30 steps: far less than a restart costs
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "straggler: keeping " in log and "(rank 1): it does not pay; keeping it costs " in log, log
    ended = [json.loads(x)["ended"] for x in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert ended == ["finished"]
