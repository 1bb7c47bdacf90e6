"""Exact resume for every strategy: a run stopped by a preemption signal at step 7 (sent to one rank only; every
rank stops and saves) and resumed with resume=auto repeats the uninterrupted run's losses bitwise (CPU, fp32):
model, optimizer, RNG streams and data position all come back. Also: resume on another world size (DCP reshards,
the data continues by global sample index), and DeepSpeed refusing to.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import launch, losses, read_metrics
from strategy_runs import COMMON, run

CASES = {
    "ddp": ["strategy=ddp"],
    "fsdp": ["strategy=fsdp"],
    # checkpoints written in the background, staged while the next step's forward and backward run
    "fsdp_async": ["strategy=fsdp", "checkpoint.async=true"],
    "zero1": ["strategy=zero1"],
    # replicated state staged once over the ranks, not whole on each
    "ddp_async": ["strategy=ddp", "checkpoint.async=true"],
    "zero1_async": ["strategy=zero1", "checkpoint.async=true"],
    "deepspeed_zero3": ["strategy=deepspeed", "strategy.stage=3"],
    "pipeline_1f1b": ["strategy=pipeline", "strategy.schedule=1f1b"],  # the tied head lives on stage 1
}
RESUME_COMMON = [o for o in COMMON if not o.startswith(("checkpoint.", "train.eval_interval", "train.max_steps"))] + [
    "train.progress=false", "train.eval_interval=0", "train.max_steps=20"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, data_overrides) -> Path:
    run("single", tmp_path_factory, data_overrides)  # prepares the data
    data_dir = next(o.split("=", 1)[1] for o in data_overrides if o.startswith("data.dir="))
    out = tmp_path_factory.mktemp("resume")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).with_name("resume_worker.py")), str(out), data_dir, json.dumps(CASES),
           json.dumps(RESUME_COMMON)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


@pytest.mark.slow
def test_a_background_checkpoint_holds_the_weights_of_its_step(resumed):
    """Training went on while step 10's state was copied and written: the copy must be step 10's, as the
    synchronous save of the same run wrote it."""
    from gpt.checkpoint.writer import load_model

    sync, _, _ = load_model(resumed / "fsdp" / "full" / "checkpoints" / "step_00000010")
    background, meta, _ = load_model(resumed / "fsdp_async" / "full" / "checkpoints" / "step_00000010")
    assert meta["step"] == 10
    for key, value in sync.state_dict().items():
        assert torch.equal(background.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["ddp_async", "zero1_async"])
@pytest.mark.slow
def test_each_rank_stages_only_what_it_writes(name, resumed):
    """A replicated model (and DDP's replicated moments) is written once, by one rank or the other: the staging
    copies of the two ranks add up to one checkpoint, not two."""
    import torch.distributed.checkpoint as dcp

    folder = resumed / name / "full" / "checkpoints" / "step_00000010"  # every save stages the same state
    meta = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    written = sum(m.size.numel() * m.properties.dtype.itemsize for m in meta.values() if hasattr(m, "size"))
    staged = [json.loads((resumed / name / f"staged_rank{r}.json").read_text())[0] for r in (0, 1)]
    assert sum(staged) == pytest.approx(written, rel=0.01), (staged, written)
    assert max(staged) < 0.6 * written, (staged, written)  # spread over the holders, as DCP spreads the writes


@pytest.mark.parametrize("name", CASES)
@pytest.mark.slow
def test_resumed_run_repeats_the_uninterrupted_losses_bitwise(name, resumed):
    full, again = losses(resumed / name / "full"), losses(resumed / name / "stopped")
    assert len(full) == 20
    assert again == full  # bitwise: the stopped run's records after step 7 were dropped, then written again
    steps = [r["step"] for r in read_metrics(resumed / name / "stopped")]
    assert steps == list(range(1, 21))


@pytest.mark.slow
def test_single_process_stopped_by_a_signal_resumes_bitwise_with_the_same_command(tmp_path, data_overrides):
    args = [*RESUME_COMMON, *data_overrides, "checkpoint.interval_steps=5"]
    full = tmp_path / "full"
    launch(*args, run_dir=full)
    stopped = tmp_path / "stopped"
    proc = launch(*args, "debug.signal_at_step=7", "debug.signal_name=SIGTERM", run_dir=stopped, check=False)
    assert proc.returncode != 0 and "run the same command" in proc.stderr, proc.stderr[-3000:]
    launch(*args, run_dir=stopped)  # the same command again (without the test's self-signal)
    assert losses(stopped) == losses(full)
    attempts = [json.loads(x) for x in (stopped / "attempts.jsonl").read_text().splitlines()]
    assert [(a["first_step"], a["last_step"], a["ended"]) for a in attempts] == [
        (0, 7, "preempted:SIGTERM"), (7, 20, "finished")]


@pytest.mark.slow
def test_resume_on_another_world_size_reshards_and_continues_by_sample(tmp_path, data_overrides):
    """DDP on 2 ranks to step 10, then ONE process resumes it: DCP reshards model and optimizer, and the same
    global batch means the same samples from step 10 on, so the losses follow a one-process run's."""
    args = [*RESUME_COMMON, *data_overrides, "train.decay_steps=20", "checkpoint.interval_steps=0"]
    launch(*args, "train.max_steps=10", "strategy=ddp", "nodes=2", run_dir=tmp_path / "two")
    launch(*args, f"resume={tmp_path / 'two'}", run_dir=tmp_path / "one")
    launch(*args, run_dir=tmp_path / "baseline")
    one, baseline = losses(tmp_path / "one"), losses(tmp_path / "baseline")
    assert [r["step"] for r in read_metrics(tmp_path / "one")] == list(range(11, 21))
    assert one == pytest.approx(baseline[10:], rel=1e-5)  # 2-rank vs 1-rank reduction order: not bitwise


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_overrides) -> list[float]:
    """20 steps of one process: what a run continued under another strategy follows."""
    run_dir = tmp_path_factory.mktemp("one_process")
    launch(*RESUME_COMMON, *data_overrides, "train.decay_steps=20", "checkpoint.interval_steps=0", run_dir=run_dir)
    return losses(run_dir)


@pytest.mark.parametrize("first, then", [("ddp", "pipeline"), ("fsdp", "pipeline"), ("zero1", "pipeline"),
                                         ("pipeline", "fsdp")])
@pytest.mark.slow
def test_a_tied_model_continues_into_and_out_of_the_pipeline(first, then, one_process, tmp_path, data_overrides):
    """The tiny model ties its embeddings: the pipeline's last stage holds a copy of wte as lm_head, where every
    other strategy holds one parameter. Its checkpoints hold that parameter's optimizer state once, under wte, as
    the others' do, so the run continues under the other strategy as if uninterrupted."""
    args = [*RESUME_COMMON, *data_overrides, "train.decay_steps=20", "checkpoint.interval_steps=10",
            "cluster.tasks_per_node=2"]
    launch(*args, f"strategy={first}", "train.max_steps=10", run_dir=tmp_path)
    launch(*args, f"strategy={then}", run_dir=tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 21))
    assert losses(tmp_path) == pytest.approx(one_process, rel=1e-5)  # 2-rank vs 1-rank reduction order


@pytest.mark.slow
def test_deepspeed_refuses_another_world_size(tmp_path, data_overrides):
    args = [*COMMON, *data_overrides, "strategy=deepspeed", "strategy.stage=2", "train.max_steps=3",
            "train.decay_steps=20", "checkpoint.interval_steps=0"]
    launch(*args, "cluster.tasks_per_node=2", run_dir=tmp_path / "two")
    proc = launch(*args, "train.max_steps=4", "cluster.tasks_per_node=1",
                  f"resume={tmp_path / 'two'}", run_dir=tmp_path / "one", check=False)
    assert proc.returncode == 2  # refused at planning, before any rank (or a job's queue)
    assert "cannot be resharded" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "one" / "metrics").exists()


@pytest.mark.slow
def test_deepspeed_refuses_a_zero_stage_its_checkpoint_does_not_load_into_and_continues_into_one_it_does(
        tmp_path, data_overrides):
    """ZeRO-3's checkpoint files are not ZeRO-2's: refused at planning in one line naming both stages, where the
    ranks failed with a bare AssertionError and advised removing the checkpoints. ZeRO-1 continues ZeRO-2's."""
    args = [*COMMON, *data_overrides, "strategy=deepspeed", "cluster.tasks_per_node=2", "train.decay_steps=20",
            "checkpoint.interval_steps=0"]
    launch(*args, "strategy.stage=2", "train.max_steps=3", run_dir=tmp_path)
    proc = launch(*args, "strategy.stage=3", "train.max_steps=4", run_dir=tmp_path, check=False)
    assert proc.returncode == 2
    assert ("was written with strategy.stage=2 and this run asks for strategy.stage=3: DeepSpeed's ZeRO-2 "
            "checkpoint does not load into ZeRO-3; continue with strategy.stage=1 or 2") in proc.stderr, proc.stderr
    assert "loading failed" not in proc.stderr and "remove the broken ones" not in proc.stderr
    launch(*args, "strategy.stage=1", "train.max_steps=4", run_dir=tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_under_another_layout_reshards_model_and_optimizer(tmp_path, data_overrides):
    """FSDP on 4 ranks to step 10, resumed as tp=2 x dp_shard=2: DCP reshards every parameter and Adam moment
    from 4 flat shards into tensor-parallel pieces that are themselves sharded. Losses continue those of one
    process; a moment left at zero or a piece put in the wrong place moves them by far more than 1e-5."""
    args = [*RESUME_COMMON, *data_overrides, "train.decay_steps=20", "checkpoint.interval_steps=0",
            "cluster.tasks_per_node=4", "strategy=fsdp"]
    launch(*args, "train.max_steps=10", run_dir=tmp_path / "fsdp")
    proc = launch(*args, "parallel.tp=2", f"resume={tmp_path / 'fsdp'}", run_dir=tmp_path / "tp")
    launch(*[a for a in args if not a.startswith(("cluster.", "strategy="))], run_dir=tmp_path / "baseline")
    tp, baseline = losses(tmp_path / "tp"), losses(tmp_path / "baseline")
    assert [r["step"] for r in read_metrics(tmp_path / "tp")] == list(range(11, 21))
    assert "dp_shard=2 x tp=2" in (tmp_path / "tp" / "logs" / "rank0.log").read_text() + proc.stderr
    assert tp == pytest.approx(baseline[10:], rel=1e-5)
