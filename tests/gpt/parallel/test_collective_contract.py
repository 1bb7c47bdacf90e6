"""The collective contract NCCL relies on and gloo forgives: every rank of a group issues the same collectives, in
the same order, with the same sizes and dtypes (NCCL hangs or reduces garbage where they differ; gloo often just
errors, or not at all). Each strategy runs under TORCH_DISTRIBUTED_DEBUG=DETAIL, where torch wraps every process
group (the default one, the strategies' subgroups and meshes, the side groups of the step flags and of background
checkpoint writes) in its ProcessGroupWrapper: before each collective the ranks compare, over a gloo group of its
own, the operation, its sequence number and its tensors' shapes, dtypes and device types, and all raise on a
difference. Point-to-point sends and receives (the pipeline's activations, the step flags' recursive doubling) pass
the wrapper unchecked; a mismatch there shows as a hang, which the worker's timeout turns into a failure.

Each run covers the preflight, training with evaluations, a checkpoint every 2 steps (in the background for fsdp),
a preemption signal to one rank that every rank agrees on through the step flags, and a resume (contract_worker.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from strategy_runs import GQA, PIPELINE

COMMON = ["model=tiny", "model.n_layer=2", "train.max_steps=5", "train.warmup_steps=2", "train.global_batch_size=8",
          "train.log_interval=1", "train.eval_interval=2", "train.eval_batches=1", "checkpoint.interval_steps=2",
          "train.progress=false"]
WORLDS: dict[int, dict[str, list[str]]] = {
    2: {
        "ddp": ["strategy=ddp"],
        "fsdp_async": ["strategy=fsdp", "checkpoint.async=true"],
        "zero1": ["strategy=zero1"],
        "deepspeed_zero3": ["strategy=deepspeed", "strategy.stage=3"],
        "pipeline_1f1b": [*PIPELINE, "strategy.schedule=1f1b"],  # the tied head's gradient crosses the stages
        "tp2_sequence_parallel": ["strategy=fsdp", "parallel.tp=2", "parallel.sequence_parallel=true", *GQA],
    },
    4: {
        "hsdp2x2": ["strategy=fsdp", "parallel.dp_replicate=2"],
        "fsdp2_tp2": ["strategy=fsdp", "parallel.tp=2", *GQA],
        "pp2_dp2_ddp": [*PIPELINE, "strategy.schedule=1f1b", "strategy.dp=ddp"],
    },
}


def contract_run(world: int, cases: dict[str, list[str]], out: Path, data_dir: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           str(Path(__file__).with_name("contract_worker.py")), str(out), data_dir, json.dumps(cases),
           json.dumps(COMMON)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISTRIBUTED_DEBUG": "DETAIL"})


@pytest.fixture
def data_dir(prepared_data) -> str:
    return next(o.split("=", 1)[1] for o in prepared_data if o.startswith("data.dir="))


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(WORLDS))
def test_every_rank_issues_the_same_collectives(world, data_dir, tmp_path):
    proc = contract_run(world, WORLDS[world], tmp_path, data_dir)
    mismatches = [line for line in proc.stderr.splitlines() if "Detected mismatch" in line]
    assert proc.returncode == 0, "\n".join(mismatches[:4]) or proc.stderr[-6000:]
    for name in WORLDS[world]:
        assert sorted(p.name for p in (tmp_path / name).glob("done_rank*")) == [f"done_rank{r}" for r in range(world)]


def _mismatched_ranks(rank: int, world: int, port: int, out) -> None:
    """Two broken contracts, each on both ranks: sizes that differ, then the same collectives in another order."""
    from datetime import timedelta

    import torch.distributed as dist

    from gpt.collectives import process_group as pg

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    broken = {"sizes": lambda: pg.all_reduce_values([0.0] * (rank + 1)),
              "order": lambda: (pg.barrier(), pg.gather_vectors([1.0])) if rank == 0 else
              (pg.gather_vectors([1.0]), pg.barrier())}
    for name, call in broken.items():
        try:
            call()
            out[f"{name}{rank}"] = "passed"
        except RuntimeError as e:
            out[f"{name}{rank}"] = str(e).split(".")[0]
    os._exit(0)  # skips gloo's racy teardown


@pytest.mark.slow
def test_the_wrapper_refuses_ranks_that_differ(monkeypatch):
    """The check the runs above rely on can fail: under DETAIL, a size or an order that differs between the ranks
    raises on every rank before the collective runs (gloo alone would hang, or sum garbage)."""
    from helpers import spawn_ranks

    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")  # read as each rank imports torch
    out = spawn_ranks(_mismatched_ranks, 2)
    assert out == {f"{name}{r}": "Detected mismatch between collectives on ranks" for name in ("sizes", "order")
                   for r in range(2)}


def test_a_host_tensor_on_a_group_nccl_alone_serves_is_refused(monkeypatch):
    """The stand-in's device check can fail: a tensor moved to the host on purpose, handed to a group that would be
    NCCL's alone on GPUs, is refused; on the default group or a gloo side group, or made on the run's own device,
    it goes through."""
    import torch
    import torch.distributed as dist

    from cuda_standin import NcclGroups

    sent, split, side = [], object(), object()
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: sent.append(group))
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: side)
    checks = NcclGroups().install(monkeypatch)
    dist.new_group(backend="gloo")
    run_device = torch.device("cpu")  # the run's device, the CPU only because the test runs here
    for ok in (torch.zeros(2, device=run_device), torch.zeros(2).to(run_device)):
        dist.all_reduce(ok, group=split)
    for host in (torch.zeros(2).cpu(), torch.zeros(2).to("cpu"), torch.ones(1).to(device="cpu:0")):
        dist.all_reduce(host, group=None)
        dist.all_reduce(host, group=side)
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(host, group=split)
    assert sent == [split, split, None, side, None, side, None, side] and checks.refused == ["all_reduce"] * 3
