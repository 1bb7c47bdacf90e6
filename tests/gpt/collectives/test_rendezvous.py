"""The rendezvous preflight: a rank that cannot join, or a world that never fills, is an error naming the rank
and its host within the timeout, never a hang."""
from __future__ import annotations

import os
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from gpt.collectives.process_group import DistEnv, RendezvousError, init_process_group
from helpers import free_port


@pytest.mark.timeout(60)
def test_missing_rank_is_named_after_the_timeout():
    env = DistEnv(rank=0, world_size=3, master_addr="127.0.0.1", master_port=free_port(), hostname="node-a")
    start = time.monotonic()
    with pytest.raises(RendezvousError) as e:
        init_process_group(env, torch.device("cpu"), join_timeout_s=1.5)
    assert time.monotonic() - start < 15
    message = str(e.value)
    assert message.startswith("rank 0 on node-a: only 1 of 3 ranks joined"), message
    assert "missing rank(s): 1-2" in message


@pytest.mark.timeout(60)
@pytest.mark.slow
def test_rank_that_cannot_reach_the_master_names_itself():
    env = DistEnv(rank=2, world_size=3, master_addr="127.0.0.1", master_port=free_port(), hostname="node-c")
    with pytest.raises(RendezvousError) as e:
        init_process_group(env, torch.device("cpu"), join_timeout_s=1.5)
    message = str(e.value)
    assert message.startswith(f"rank 2 on node-c could not reach the rendezvous at 127.0.0.1:{env.master_port}")


@pytest.mark.timeout(60)
def test_a_rank_who_waits_for_a_missing_rank_0_says_so():
    """Only rank 0 reads every rank's entry, so another rank does not name every missing one: it says how many
    came, and whether rank 0 (which names the rest in its log) did."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)  # served by another (the agent)
    env = DistEnv(rank=1, world_size=2, master_addr="127.0.0.1", master_port=store.port, hostname="node-b")
    with mock.patch.dict(os.environ, {"TORCHELASTIC_USE_AGENT_STORE": "True"}), pytest.raises(RendezvousError) as e:
        init_process_group(env, torch.device("cpu"), join_timeout_s=1.5)
    assert str(e.value) == (f"rank 1 on node-b: only 1 of 2 ranks joined the rendezvous at 127.0.0.1:{store.port} "
                            "within 2 s; rank 0 is missing (raise rendezvous.timeout_s if nodes start slowly)")


def _rendezvous_costs(world: int) -> dict[int, tuple[int, int]]:
    """Each rank's (store requests, keys read) to join a `world`-rank job, every rank a thread of this process."""
    from benchmarks.startup_scale import Rank, join_in_threads

    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    ranks = {r: Rank(r, world) for r in range(world)}
    join_in_threads(ranks, store.port)
    assert not [me.error for me in ranks.values() if me.error]
    return {r: me.spent["rendezvous"] for r, me in ranks.items()}


@pytest.mark.slow  # rendezvous of 8 and 16 ranks in threads: seconds
@pytest.mark.timeout(120)
def test_no_rank_but_rank_0_reads_the_others_entries(monkeypatch):
    """Each rank reading every rank's entry made W^2 store reads over the job (67 million at 8,192 ranks, all from
    one server): now a rank reads one key (the verdict), and rank 0 reads all entries in one request."""
    monkeypatch.delenv("TORCH_GLOO_LAZY_INIT", raising=False)  # init_process_group sets it for the rank's life
    small, large = _rendezvous_costs(8), _rendezvous_costs(16)
    for costs in (small, large):
        assert max(keys for r, (_, keys) in costs.items() if r) == 1, costs
    # a rank's requests do not grow with the world: the same in both, but one more for whichever rank checks in
    # last (it marks the world full), which the machine's timing picks
    zero = {costs[0][0] for costs in (small, large)}
    others = {c[0] for costs in (small, large) for r, c in costs.items() if r}
    assert max(zero) - min(zero) <= 1 and max(others) - min(others) <= 1, (small, large)


def test_c10ds_hostname_warning_is_left_out_of_the_ranks_log_and_every_other_line_kept(monkeypatch, capfd):
    """c10d writes it from C++ to fd 2 as the store connects, on every rank of a node whose resolver cannot answer
    (the test cluster's nodes, many sites' compute nodes): the stand-in store writes to fd 2 as C++ does."""
    from gpt.collectives import process_group

    said = (b"[W1127 21:22:06.895335639 socket.cpp:207] [c10d] The hostname of the client socket cannot be "
            b"retrieved. err=-3\n")
    other = b"[W1127 21:22:06.9 socket.cpp:941] [c10d] The server socket on gl-n1:29500 is not yet listening\n"

    def store(*args, **kw):
        os.write(2, said + other)
        return "store"
    monkeypatch.setattr(process_group.dist, "TCPStore", store)
    env = process_group.DistEnv(rank=1, world_size=2, master_addr="gl-n1", master_port=29500, hostname="gl-n2")
    assert process_group._open_store(env, 5.0) == "store"
    out, err = capfd.readouterr()
    assert err == other.decode() and out == "", err


def test_what_a_rank_says_while_its_store_connects_is_written_at_once(monkeypatch, capfd):
    """The store may wait rendezvous.timeout_s for its master: a line written meanwhile (the watchdog's, c10d's) is
    in the rank's log at once, not held until the store answers, where a rank killed first would lose it."""
    from gpt.collectives import process_group

    line = b"[W1127 21:22:06.9 socket.cpp:941] [c10d] The server socket on gl-n1:29500 is not yet listening\n"

    def store(*args, **kw):
        os.write(2, line)
        deadline, seen = time.monotonic() + 10, ""
        while line.decode() not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
            seen += capfd.readouterr().err
        return seen
    monkeypatch.setattr(process_group.dist, "TCPStore", store)
    env = process_group.DistEnv(rank=1, world_size=2, master_addr="gl-n1", master_port=29500, hostname="gl-n2")
    assert process_group._open_store(env, 5.0) == line.decode()


def test_stragglers_figures_go_over_nccl_where_the_group_has_it(monkeypatch):
    """gloo's all_gather is a ring of TCP hops that grows with the world, at every log step: on GPUs the figures go
    over NCCL's leg (here, a CPU build, the attempt to place them on the GPU is what shows it)."""
    import torch

    from gpt.collectives import process_group

    monkeypatch.setattr(process_group, "is_multi", lambda group=None: True)
    monkeypatch.setattr(process_group.dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        process_group.gather_vectors([1.0, 2.0])
