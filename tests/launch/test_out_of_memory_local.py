"""A local run whose rank runs out of device memory (launch.recovery.out_of_memory): the rank's allocator is
tests/cuda_standin.py's, with a capacity that micro-batch 8 overflows and micro-batch 4 fits. The run takes an in-job
round with micro-batch 4 and the same global batch, from its checkpoint, and trains on exactly as a run at
micro-batch 4 would."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import REPO, compose, launch, read_metrics
from launch import launch_config

RUN = ["model=tiny", "strategy=ddp", "train.max_steps=8", "train.global_batch_size=16", "train.warmup_steps=2",
       "train.log_interval=1", "train.eval_interval=0", "checkpoint.interval_steps=4"]
SITE = """import sys
sys.path.insert(0, {tests!r})
from cuda_standin import StrictCuda
HOLDING = StrictCuda(capacity={capacity}).holding_saved_tensors()  # kept: the generator's end would end it
HOLDING.__enter__()  # in the rank server's main thread, for good: every rank forked from it
"""


def capacity_between(small: int, large: int) -> int:
    """Device memory that a step of the tiny model at micro-batch `large` overflows and one at `small` fits: halfway
    between what each holds for its backward, measured here with the same stand-in."""
    from cuda_standin import StrictCuda
    from gpt.model.transformer import GPT

    cfg = dataclasses.replace(launch_config.parse(compose("model=tiny")).model, vocab_size=65)
    model = GPT(cfg)
    cuda, peaks = StrictCuda(), []
    with cuda.holding_saved_tensors():
        for micro in (small, large):
            cuda.memory.update(allocated=0, peak=0)
            x = torch.zeros(micro, cfg.block_size, dtype=torch.long)
            model(x, x)[1].backward()
            peaks.append(cuda.memory["peak"])
    return sum(peaks) // 2


def with_capacity(tmp_path: Path, capacity: int) -> dict[str, str]:
    """The environment of a launch whose processes (its rank server, so every rank) hold that much device memory."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE.format(tests=str(REPO / "tests"), capacity=capacity))
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.timeout(300)
@pytest.mark.slow
# 2 ranks, each out of memory at once (the harder case: one decides for both, the other leaves it)
@pytest.mark.parametrize("ranks", [2])
def test_a_rank_out_of_memory_trains_on_with_half_the_micro_batch_from_its_checkpoint(tmp_path, data_overrides, ranks):
    """With 2 ranks every rank runs out at once (each has as much memory): the first decides, the other leaves it."""
    command = [*RUN, f"cluster.tasks_per_node={ranks}", *data_overrides]
    reference = tmp_path / "reference"
    launch(*command, "train.micro_batch_size=4", run_dir=reference)
    start = reference / "checkpoints" / "step_00000004"
    assert start.is_dir()
    run = tmp_path / "run"
    proc = launch(*command, "train.micro_batch_size=8", f"resume={start}", run_dir=run,
                  env=with_capacity(tmp_path, capacity_between(4, 8)))
    log = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
    # its first step, which the trainer measures with hooks of its own, runs out too
    assert [(a["ended"], a.get("in_job_restart"), a.get("round", 0), a["first_step"]) for a in log] == \
        [("out of memory", 1, 0, 4), ("finished", None, 1, 4)], log
    said = log[0]["out_of_memory"]
    assert said["rank"] in range(ranks)
    assert {k: said[k] for k in ("step", "micro_batch", "accumulation", "global_batch", "next_micro_batch",
                                 "next_accumulation")} == {"step": 4, "micro_batch": 8, "accumulation": 2 // ranks,
                                                           "global_batch": 16, "next_micro_batch": 4,
                                                           "next_accumulation": 4 // ranks}
    line = (f"rank {said['rank']} ran out of device memory at step 4 with micro-batch 8: the next round trains with "
            f"micro-batch 4 and accumulation {4 // ranks}, the same global batch 16; restarting inside the allocation")
    assert log[0]["note"].startswith(line) and line in proc.stderr, proc.stderr[-3000:]
    assert launch_config.load(run / "config.yaml").train.micro_batch_size == 4
    # steps 5-8, from the same checkpoint, exactly as the run at micro-batch 4 trained them
    ours = {r["step"]: r["loss"] for r in read_metrics(run)}
    assert ours == {r["step"]: r["loss"] for r in read_metrics(reference) if r["step"] > 4}
