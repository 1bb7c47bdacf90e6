"""The step's flags summed over the ranks beside training, in log2(ranks) rounds.

The trainer casts a few host floats (checkpoint written, interval due, signal votes) at one step and reads their
sums at the next. gloo's all_reduce is a ring: its latency grows linearly with the ranks (2(n-1) hops). Recursive
doubling needs ceil(log2 n) exchange rounds (two more when n is not a power of two), so 8,192 ranks cost about 15
hops instead of 16,382. It runs on a daemon thread of its own over a gloo side group (see process_group.side_group):
the training loop never blocks on it until it reads the sums. The values are counts and 0/1 flags, so the sums are
exact and the same on every rank whatever order the rounds add them in.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist

from gpt.collectives.process_group import is_multi
from gpt.resilience.progress import PROGRESS


def doubling_rounds(rank: int, world: int) -> list[tuple[str, int]]:
    """What `rank` does, in order, to sum over `world` ranks: ("send"|"recv"|"swap", peer). Ranks past the largest
    power of two p fold into rank - p first and get the sum back last; the first p swap with rank ^ 2^k."""
    p = 1 << (world.bit_length() - 1)
    if rank >= p:
        return [("send", rank - p), ("recv", rank - p)]
    folded = rank + p < world
    steps = [("recv", rank + p)] if folded else []
    steps += [("swap", rank ^ bit) for bit in (1 << k for k in range(p.bit_length() - 1))]
    return steps + ([("send", rank + p)] if folded else [])


def _sum(values: torch.Tensor, group: Any) -> torch.Tensor:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    incoming = torch.empty_like(values)
    for op, peer in doubling_rounds(rank, world):
        if op == "send":
            dist.send(values, group=group, group_dst=peer)
        elif op == "recv":
            dist.recv(incoming, group=group, group_src=peer)
            values = incoming.clone() if peer < rank else values + incoming  # a folded rank takes the sum back
        else:
            for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, values, group=group, group_peer=peer),
                                                dist.P2POp(dist.irecv, incoming, group=group, group_peer=peer)]):
                work.wait()
            values = values + incoming
    return values


class _Lane:
    """One daemon thread per group, summing casts in the order they were made (a gloo group is not for two threads
    at once); a daemon, so a rank whose peers died can still exit."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.todo: queue.SimpleQueue[tuple[torch.Tensor, Future]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="gptlaunch-step-flags", daemon=True).start()

    def _run(self) -> None:
        while True:
            values, future = self.todo.get()
            try:
                future.set_result(_sum(values, self.group))
            except Exception as e:  # the reader raises it, where the training loop can act on it
                future.set_exception(e)


_LANES: dict[int, _Lane] = {}


class BackgroundSum:
    """A few host floats being summed over the ranks while this rank goes on."""

    def __init__(self, values: torch.Tensor, future: Future | None = None) -> None:
        self.values, self.future = values, future  # no future: nothing to wait for (one process)

    def wait(self) -> tuple[float, list[float]]:
        """(seconds this rank waited for the others, the sums)."""
        if self.future is None:
            return 0.0, self.values.tolist()
        start = time.perf_counter()
        with PROGRESS.collective("step flags (recursive doubling)"):
            sums = self.future.result()
        return time.perf_counter() - start, sums.tolist()


def sum_in_background(values: Sequence[float], group: Any = None) -> BackgroundSum:
    """Start summing host floats over `group` (a gloo group of their own: no GPU synchronisation, the step's
    kernels stay queued); every rank of the group calls it, once per cast, in the same order."""
    tensor = torch.tensor(list(values), dtype=torch.float64)
    if not is_multi(group):
        return BackgroundSum(tensor)
    lane = _LANES.get(id(group))
    if lane is None or lane.group is not group:
        lane = _LANES[id(group)] = _Lane(group)
    future: Future = Future()
    lane.todo.put((tensor, future))
    return BackgroundSum(tensor, future)
