"""benchmarks/startup_scale.py at tiny sizes: what a rank pays to join the job and to make and first use its gloo
groups stays flat in the world size W, or grows with log2 W where a collective's algorithm does (the step flags'
recursive doubling); only rank 0, which serves the store and is DCP's coordinator, pays per rank of the job."""
from __future__ import annotations

import math

import pytest

from benchmarks.startup_scale import PHASES, group_creations, measure

SIZES = (8, 16)


@pytest.fixture(scope="module")
def figures():
    return {w: measure(w, per_process=w // 2) for w in SIZES}  # rank 0 and two processes of threads


def test_every_other_rank_pays_the_same_whatever_the_world_size(figures):
    for w, f in figures.items():
        log = int(math.log2(w))
        assert f.store["other ranks"] == {  # [requests, keys read]
            "rendezvous": [5, 1],  # its entry, the count, the wait, the verdict; the last rank in says so
            "default group": [5, 2],  # gloo's address, then each ring neighbour's, looked up when first used
            "step flags group": [1 + 2 * log, log],  # one partner per round of the doubling
            "async checkpoint group": [3, 1]}  # rank 0, the coordinator
        sockets = {p: f.files["other ranks"][p]["socket"] for p in PHASES[1:]}
        assert sockets == {"default group": 4, "step flags group": 1 + log, "async checkpoint group": 2}, w
        assert {f.files["other ranks"][p]["other"] for p in PHASES[1:]} == {3}  # a group's pipes and its epoll


def test_rank_0_reads_every_entry_in_one_request_and_serves_a_socket_per_rank(figures):
    for w, f in figures.items():
        assert f.store["rank 0"]["rendezvous"] == [5, w]
        assert f.store["rank 0"]["default group"] == [5, 2]
        assert f.server_sockets == w
        assert f.files["rank 0"]["async checkpoint group"]["socket"] == w  # the gather: a peer per rank


def test_a_rank_makes_its_node_and_tie_groups_in_one_step():
    for w in SIZES:
        assert group_creations(w) == {"health node groups": 1, "pipeline tie groups": 1,
                                      "node groups by torch's enumeration": w // 8}
