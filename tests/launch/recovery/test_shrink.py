"""Going on with fewer nodes (preemption.shrink, launch.recovery.shrink): a node lost with no spare left, the next round
runs on the nodes left with the same global batch, or the job requeues with the reason it could not."""
from __future__ import annotations

import json

import pytest

from gpt.config import schema
from gpt.errors import ConfigError
from gpt.resilience.goodput import run_goodput
from gpt.run_folder import Next, RunFolder
from helpers import compose
from launch import launch_config
from launch.rank.job_env import ROUND_VAR
from launch.recovery.decision import Cause, recover
from launch.recovery.round_agent import RoundAgent

from test_recovery import Scheduler, end

SHRINKS = ("strategy=ddp", "preemption.shrink=auto", "train.global_batch_size=12", "train.micro_batch_size=2")


class TwoNodes(Scheduler):
    @property
    def hosts(self) -> list[str]:
        return ["n1", "n2"]


def lose_n2(run_dir, *overrides: str, per_node: int = 1, nodes: int = 3, cause: Cause = Cause.HANG):
    """A job of `nodes` nodes (n1, n2, n3) of `per_node` ranks a node, no spare, whose node n2 hung: what the one
    decision makes of it."""
    schema.save(launch_config.parse(compose("cluster=srun", *overrides)), RunFolder(run_dir).config)
    environ = {ROUND_VAR: "0", "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS": str(nodes * per_node)}
    job = Scheduler(environ=environ) if nodes == 3 else TwoNodes(environ=environ)
    return recover(end(run_dir, job, cause, ("n2",))), job


def test_a_lost_node_with_no_spare_left_shrinks_the_data_parallel_size_and_keeps_the_global_batch(tmp_path):
    got, job = lose_n2(tmp_path, *SHRINKS)
    assert got.next is Next.RESTART and job.asked == []  # no requeue
    (line,) = RunFolder(tmp_path).attempts.read()
    assert (line.in_job_restart, dict(line.shrunk), line.requeued) == (1, {"from": 3, "to": 2}, False)
    assert "on 2 of 3 node(s), 3 -> 2 ranks: data-parallel 3 -> 2, accumulation 2 -> 3 at micro-batch 2, the same " \
           "global batch 12" in line.note
    request = json.loads((tmp_path / "rounds" / "job77-restart0" / "round-1.json").read_text())
    assert request["hosts"] == ["n1", "n3"] and request["shrunk"]["world_to"] == 2
    run = launch_config.load(RunFolder(tmp_path).config)
    assert run.train.micro_batches(2) == (2, 3)  # 2 ranks x 3 micro-steps x 2 sequences: the global batch 12
    assert run_goodput([line]).interruptions == ["hang (went on with 2 of 3 ranks)"]  # in the goodput line


def test_an_unset_micro_batch_is_kept_in_config_yaml_so_that_the_ranks_accumulate_more(tmp_path):
    got, _ = lose_n2(tmp_path, *SHRINKS[:3], nodes=2)  # 6 a rank on 2 nodes, not 12 on 1
    assert got.next is Next.RESTART and "accumulation 1 -> 2 at micro-batch 6" in got.note
    assert launch_config.load(RunFolder(tmp_path).config).train.micro_batch_size == 6


@pytest.mark.parametrize("overrides, why", [
    ((), ""),  # shrink=never: requeued as ever, nothing said of shrinking
    ((*SHRINKS, "train.micro_batch_size=null"), "cannot go on with 2 of 3 node(s): train.global_batch_size=12 is not "
                                                "a whole number of micro-batches 4 x data-parallel size 2"),
    ((*SHRINKS, "preemption.min_nodes=3"), "cannot go on with 2 of 3 node(s): fewer than preemption.min_nodes=3"),
    ((*SHRINKS, "parallel.dp_replicate=3"), "cannot go on with 2 of 3 node(s): parallel.dp_replicate=3 is not valid"),
])
def test_a_layout_that_cannot_shrink_requeues_and_says_why(tmp_path, overrides, why):
    got, job = lose_n2(tmp_path, "strategy=ddp", *overrides)
    assert got.next is Next.REQUEUE and job.asked == [("requeue_excluding", ["n2"])]
    assert not (tmp_path / "rounds" / "job77-restart0" / "round-1.json").exists()
    (line,) = RunFolder(tmp_path).attempts.read()
    assert line.shrunk is None and (why in line.note if why else "cannot go on" not in line.note)
    if why:
        assert line.note.startswith("too few healthy nodes to restart inside the allocation (n2 is lost, no spare")


def test_a_straggler_is_left_out_by_a_requeue_that_gets_the_whole_world_back_not_by_shrinking(tmp_path):
    got, job = lose_n2(tmp_path, *SHRINKS, cause=Cause.STRAGGLER)
    assert got.next is Next.REQUEUE and job.asked == [("requeue_excluding", ["n2"])] and "cannot" not in got.note


def test_the_lost_nodes_task_starts_no_rank_and_the_others_are_placed_in_the_smaller_world(tmp_path):
    got, _ = lose_n2(tmp_path, *SHRINKS[:3], "train.micro_batch_size=1", per_node=2)
    assert "6 -> 4 ranks" in got.note
    env = {ROUND_VAR: "0", "SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1"}
    placed = {host: RoundAgent(tmp_path, Scheduler(environ=env), host).placement(1) for host in ("n1", "n2", "n3")}
    assert placed["n2"] is None  # waits as a spare would: the round ends it
    assert {k: placed["n3"][k] for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_NNODES")} == {
        "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_NNODES": "2"}


@pytest.mark.parametrize("override, key", [("preemption.shrink=sometimes", "preemption.shrink"),
                                           ("preemption.min_nodes=0", "preemption.min_nodes")])
def test_the_settings_are_checked_in_one_line(override, key):
    with pytest.raises(ConfigError, match=key):
        launch_config.parse(compose(override))
