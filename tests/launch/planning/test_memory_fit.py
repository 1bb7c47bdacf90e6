"""The fit check at planning: a layout whose ranks would not fit their devices' memory is refused in one line with
the estimate and what would fit, before the data is prepared or anything is written or submitted; and
train.micro_batch_size=auto, chosen from the same estimate."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from gpt.errors import UserError
from gpt.parallel.layout import ParallelDims
from gpt.parallel.memory_estimate import GIB, estimate
from gpt.run_folder import RunFolder
from helpers import SHAKESPEARE, compose, make_plan_of
from gpt.config.schema import load
from launch import launch_config
from launch.planning.memory_fit import USABLE, Device, fit

GPU_JOB = ["model=gpt2_124m", "cluster=slurm", "cluster.gpus_per_node=1", "cluster.tasks_per_node=1", "strategy=ddp",
           "train.global_batch_size=8", f"data.text_path={SHAKESPEARE}"]


@pytest.mark.parametrize("memory,fits", [(4, False), (80, True)])
@pytest.mark.slow
def test_a_layout_that_does_not_fit_the_stated_memory_is_refused_before_anything(memory, fits, tmp_path):
    run = launch_config.parse(compose(*GPU_JOB, f"cluster.gpu_memory_gb={memory}", f"data.dir={tmp_path / 'data'}"))
    if fits:
        make_plan_of(run, tmp_path / "run")
        return
    with pytest.raises(UserError) as refused:
        make_plan_of(run, tmp_path / "run")
    line = str(refused.value)
    assert "\n" not in line and "does not fit" in line and "4.0 GiB of its GPU" in line
    assert line.endswith("what would fit: train.micro_batch_size=1")  # the largest micro-batch that fits
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # nothing prepared, nothing written


def auto_job(tmp_path, memory: int, batch: int = 12):
    """A GPU job of `batch` sequences on one rank with train.micro_batch_size=auto; the data is prepared in its job
    (not here: planning stays quick)."""
    return launch_config.parse(compose(*GPU_JOB, f"train.global_batch_size={batch}", "train.micro_batch_size=auto",
                              f"cluster.gpu_memory_gb={memory}", "data.prepare_on=job", f"data.dir={tmp_path / 'data'}"))


def peak_gib(run, micro: int) -> float:
    dims = ParallelDims()
    return estimate(run.model, dataclasses.replace(run.train, micro_batch_size=micro), run.strategy, dims, micro).peak / GIB


@pytest.mark.parametrize("memory,chosen", [(4, 1), (9, 4), (12, 6)])
def test_auto_picks_the_largest_divisor_of_the_per_rank_batch_that_fits_the_stated_memory(memory, chosen, tmp_path):
    run = auto_job(tmp_path, memory)
    train = fit(run.strategy, run.model, run.train, ParallelDims(), Device("cuda", memory))
    assert train.micro_batch_size == chosen  # a bigger memory picks a bigger one
    assert peak_gib(run, chosen) <= USABLE * memory
    assert all(peak_gib(run, m) > USABLE * memory for m in (3, 4, 6, 12) if m > chosen)  # larger divisors do not fit
    if chosen == 4:  # 5 would fit too, but does not divide 12
        assert peak_gib(run, 5) <= USABLE * memory


def test_the_plan_states_its_choice_and_writes_it_for_every_rank(tmp_path, caplog):
    with caplog.at_level("INFO", logger="launch.planning.memory_fit"):
        make_plan_of(auto_job(tmp_path, 9), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if "micro_batch_size=auto" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("train.micro_batch_size=auto: 4 of a per-rank batch of 12; each "
                                                   "rank about ")
    assert "within 90% of the 9.0 GiB of its GPU (10% headroom)" in lines[0]
    assert load(RunFolder(tmp_path / "run").config).train.micro_batch_size == 4  # what ranks and requeues read


def test_auto_refuses_as_the_fit_check_when_one_sequence_does_not_fit(tmp_path):
    with pytest.raises(UserError, match=r"needs about 3.00 GiB .*grads 0.46.*activations 1.14.* of the 2.0 GiB of its GPU; what would fit"):
        make_plan_of(auto_job(tmp_path, 2), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_job_whose_gpus_this_process_cannot_open_is_planned_without_a_fit_check(monkeypatch):
    """sbatch slurm/multi_node.sh on a node of a GPU job (the local cluster's GPUs are Slurm's, not CUDA's): the
    batch step plans as cluster=srun with the allocation's GPUs; their memory is unknown there, not a crash."""
    import torch
    from launch.backends import get_backend

    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = launch_config.parse(compose("cluster=srun"))
    backend = get_backend("srun")
    assert backend.device(run) == "cuda"
    assert backend.device_memory_gib(run, "cuda") is None


@pytest.mark.parametrize("asks, memory, fits", [
    (["cluster.gpus_per_node=0", "cluster.gres=gpu:v100:1"], 16, False),  # the type in --gres
    (["cluster.constraint=a100"], 40, True),  # or in --constraint; an A100 of unstated size: the smaller, 40 GB
    (["cluster.constraint=l4"], 24, False),
    (["cluster.gpus_per_node=0", "cluster.gres=gpu:a100_80gb:1"], 80, True),  # a size in the name is read
])
def test_a_gpu_named_by_the_job_is_checked_against_that_gpus_memory(asks, memory, fits, tmp_path):
    run = launch_config.parse(compose(*GPU_JOB, "train.global_batch_size=24", *asks, "data.prepare_on=job",
                             f"data.dir={tmp_path / 'data'}"))
    assert not run.cluster.gpu_memory_gb  # known from the name alone
    if fits:
        make_plan_of(run, tmp_path / "run")
        return
    with pytest.raises(UserError, match=rf"does not fit: .* more than 90% of the {memory}.0 GiB of its GPU; what "):
        make_plan_of(run, tmp_path / "run")


CPU_JOB = ["model=gpt2_124m", "cluster.tasks_per_node=2", "strategy=ddp", "train.global_batch_size=8",
           f"data.text_path={SHAKESPEARE}"]


@pytest.mark.parametrize("cluster, node_gib, fits", [("slurm", 8, False), ("slurm", 64, True), ("local", 8, False),
                                                     ("local", 64, True)])
def test_a_cpu_rank_is_checked_against_its_share_of_the_nodes_memory(cluster, node_gib, fits, tmp_path, monkeypatch):
    """cluster=slurm: --mem over the node's tasks; cluster=local: this machine's memory (stated here) over its ranks."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=node_gib * GIB))
    asks = [f"cluster.mem={node_gib}G", "data.prepare_on=job"] if cluster == "slurm" else []
    run = launch_config.parse(compose(*CPU_JOB, f"cluster={cluster}", *asks, f"data.dir={tmp_path / 'data'}"))
    if fits:
        make_plan_of(run, tmp_path / "run")
        return
    with pytest.raises(UserError, match=rf"more than 90% of the {node_gib / 2:.1f} GiB of its CPU rank's share of its "
                                        "node; what would fit"):
        make_plan_of(run, tmp_path / "run")
