"""A preemption signal during an evaluation: every rank asks, between evaluation batches, whether any rank was
signalled. The votes travel on the step flags' gloo group, summed in log2(ranks) rounds (gpt.collectives.flag_sum),
not in a ring all_reduce of 2(ranks - 1) hops on the default group: about 16,000 hops a batch at 8,192 ranks."""
from __future__ import annotations

import datetime

import pytest
import torch.distributed as dist

from helpers import spawn_ranks
from gpt.config.sections import PreemptionConfig
from gpt.train.step_flags import StepFlags
from gpt.train.stop import StopControl


def _rank(rank: int, world: int, port: int, out) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    stop = StopControl(PreemptionConfig())
    StepFlags(None, stop, rank == 0)  # the trainer's: its group carries the votes
    on_default, all_reduce = [], dist.all_reduce
    dist.all_reduce = lambda tensor, *a, **k: on_default.append(k.get("group")) or all_reduce(tensor, *a, **k)
    before = stop.signalled_anywhere()
    if rank == 1:
        stop.flag.received = stop.flag.signals[0]
    after = stop.signalled_anywhere()
    out[rank] = before, after, stop.reason, [g for g in on_default if g is None or g is dist.group.WORLD]
    dist.all_reduce = all_reduce
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_evaluations_votes_are_summed_on_the_flags_group_in_log_rounds():
    got = spawn_ranks(_rank, 2)
    assert got == {r: (False, True, "SIGTERM", []) for r in range(2)}
