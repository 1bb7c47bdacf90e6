"""Going on with fewer nodes (preemption.shrink=auto): a node lost with no spare left, the next round runs on the nodes
left instead of a requeue. Only the data-parallel size shrinks (tensor and pipeline sizes stay, so no rank holds more
of the model); the global batch, and so the schedule and the run's identity, stay exactly as they were: the micro-batch
is kept and each rank accumulates more micro-steps. A layout that cannot (a fixed data-parallel size, a checkpoint tied
to its world size, a global batch the fewer ranks cannot split into whole micro-batches, fewer nodes than
preemption.min_nodes) says why, and the job requeues. Torch-free.

    attempts.jsonl   the attempt's line: "shrunk": {"from": W, "to": W'} (ranks)
    round-<K>.json   the round's hosts (the nodes left) and its "shrunk" record (launch.recovery.rounds)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpt.errors import ConfigError
from gpt.parallel import plan_layout
from gpt.parallel.traits import traits_of
from launch.launch_config import LaunchConfig


@dataclass(frozen=True)
class Shrink:
    """A round on fewer nodes: its world and data-parallel sizes before and after, and the batch kept."""

    nodes_from: int
    nodes_to: int
    world_from: int
    world_to: int
    dp_from: int
    dp_to: int
    micro_batch: int
    accumulation_from: int
    accumulation_to: int
    global_batch: int

    def record(self) -> dict[str, Any]:
        """What the attempt's line says of it."""
        return {"from": self.world_from, "to": self.world_to}

    @property
    def said(self) -> str:
        return (f"on {self.nodes_to} of {self.nodes_from} node(s), {self.world_from} -> {self.world_to} ranks: "
                f"data-parallel {self.dp_from} -> {self.dp_to}, accumulation {self.accumulation_from} -> "
                f"{self.accumulation_to} at micro-batch {self.micro_batch}, the same global batch {self.global_batch}")


def survives_lost_node(run: LaunchConfig) -> bool:
    """Whether a lost node leaves the job running (a spare takes its place, or the run goes on with the nodes left):
    the scheduler must then neither end the job nor its step for a failed node."""
    return bool(run.cluster.spare_nodes) or (run.preemption.shrink == "auto" and run.preemption.in_job_restarts > 0)


def shrink(run: LaunchConfig, nodes: int, left: int, per_node: int) -> tuple[Shrink | None, str]:
    """The round on the `left` of `nodes` nodes (`per_node` ranks each) when the run may go on with them: (it, '');
    else (None, why not: '' under preemption.shrink=never, which requeues as ever)."""
    preemption, train = run.preemption, run.train
    if preemption.shrink != "auto":
        return None, ""
    cannot = f"cannot go on with {left} of {nodes} node(s)"
    if left < preemption.min_nodes:
        return None, f"{cannot}: fewer than preemption.min_nodes={preemption.min_nodes}"
    traits = traits_of(run.strategy.name)
    if not traits.reshardable:
        return None, f"{cannot}: strategy={traits.name}'s checkpoint loads only on the world size that saved it"
    try:
        before = plan_layout(run.strategy, run.parallel, run.model, nodes * per_node, per_node, train)
        micro, accumulation = train.micro_batches(before.dp)
        after = plan_layout(run.strategy, run.parallel, run.model, left * per_node, per_node, train)
    except ConfigError as e:
        return None, f"{cannot}: {e}"
    if (after.tp, after.pp) != (before.tp, before.pp):
        return None, f"{cannot}: tensor and pipeline sizes would change (tp {before.tp} -> {after.tp}, pp " \
                     f"{before.pp} -> {after.pp}); only the data-parallel size shrinks"
    if train.global_batch_size % (micro * after.dp):
        return None, (f"{cannot}: train.global_batch_size={train.global_batch_size} is not a whole number of "
                      f"micro-batches {micro} x data-parallel size {after.dp}")
    return Shrink(nodes, left, nodes * per_node, left * per_node, before.dp, after.dp, micro, accumulation,
                  train.global_batch_size // (micro * after.dp), train.global_batch_size), ""
