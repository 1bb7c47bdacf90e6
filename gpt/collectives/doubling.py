"""Small host values combined over the ranks in log2(ranks) rounds of point-to-point exchanges (recursive doubling).

gloo's all_reduce and all_gather are rings: their latency grows linearly with the ranks (2(n-1) and n-1 hops), so a
few floats cost 8,191 hops at 8,192 ranks. Here the first p ranks (p the largest power of two) swap with rank ^ 2^k in
round k; the ranks past p fold into rank - p first and get the result back last: ceil(log2 n) rounds, two more when
n is not a power of two. The sum serves the step's flags (gpt.collectives.flag_sum), the gather the log window's
per-rank figures (the straggler check, gpt.collectives.process_group.gather_vectors).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def doubling_rounds(rank: int, world: int) -> list[tuple[str, int]]:
    """What `rank` does, in order, to combine over `world` ranks: ("send"|"recv"|"swap", peer). Ranks past the
    largest power of two p fold into rank - p first and get the result back last; the first p swap with rank ^ 2^k."""
    p = 1 << (world.bit_length() - 1)
    if rank >= p:
        return [("send", rank - p), ("recv", rank - p)]
    folded = rank + p < world
    steps = [("recv", rank + p)] if folded else []
    steps += [("swap", rank ^ bit) for bit in (1 << k for k in range(p.bit_length() - 1))]
    return steps + ([("send", rank + p)] if folded else [])


def _swap(mine: torch.Tensor, theirs: torch.Tensor, peer: int, group: Any) -> None:
    """Send `mine` to `peer` while receiving `theirs` from it (a plain pair, not a coalesced batch: the default
    group's gloo side on GPU runs takes it as the gloo side group does)."""
    for work in (dist.isend(mine, group=group, group_dst=peer), dist.irecv(theirs, group=group, group_src=peer)):
        work.wait()


def doubling_sum(values: torch.Tensor, group: Any) -> torch.Tensor:
    """`values` summed over the ranks of `group` (every rank calls it with the same length)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    incoming = torch.empty_like(values)
    for op, peer in doubling_rounds(rank, world):
        if op == "send":
            dist.send(values, group=group, group_dst=peer)
        elif op == "recv":
            dist.recv(incoming, group=group, group_src=peer)
            values = incoming.clone() if peer < rank else values + incoming  # a folded rank takes the sum back
        else:
            _swap(values, incoming, peer, group)
            values = values + incoming
    return values


def held(rank: int, bit: int, world: int) -> list[int]:
    """The ranks whose rows `rank` (one of the first p) holds before its swap over `bit`: its aligned block of
    `bit` ranks, and the ranks folded into them."""
    p = 1 << (world.bit_length() - 1)
    block = range(rank & ~(bit - 1), (rank & ~(bit - 1)) + bit)
    return sorted([*block, *(q + p for q in block if q + p < world)])


def doubling_gather(row: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's `row` (a 1-D tensor, the same length on every rank of `group`), as a (world, len) tensor."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    rows = torch.empty((world, row.numel()), dtype=row.dtype, device=row.device)
    rows[rank] = row
    folded = rank >= 1 << (world.bit_length() - 1)
    for op, peer in doubling_rounds(rank, world):
        if op == "send":  # a folded rank's row to its partner; at the end, every row back to it
            dist.send(row if folded else rows, group=group, group_dst=peer)
        elif op == "recv":
            dist.recv(rows if folded else rows[peer], group=group, group_src=peer)
        else:
            mine, theirs = held(rank, rank ^ peer, world), held(peer, rank ^ peer, world)
            incoming = torch.empty((len(theirs), row.numel()), dtype=row.dtype, device=row.device)
            _swap(rows[mine].contiguous(), incoming, peer, group)
            rows[theirs] = incoming
    return rows
