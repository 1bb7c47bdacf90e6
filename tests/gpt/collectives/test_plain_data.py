"""Ranks exchange plain data, never pickles: the rendezvous store takes anyone who reaches its port (which follows
from the job id), and torch's object collectives unpickle what a peer sends. A crafted pickle where a rank's entry or
object belongs is refused, and what it would run never runs."""
from __future__ import annotations

import datetime
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gpt.collectives.process_group import (DistEnv, NotPlainData, from_rank0_object, gather_objects,
                                           init_process_group, leave)
from gpt.errors import UserError
from helpers import free_port, spawn_ranks


class CreatesAFile:
    """What an attacker pickles: unpickling it creates `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mknod, (self.path,)


@pytest.mark.timeout(60)
def test_a_crafted_store_entry_is_refused_and_never_unpickled(tmp_path):
    """Rank 0 of a 2-rank job reads every entry; an attacker writes rank 1's as a pickle and acknowledges the
    verdict. Rank 0 stops with one line, and the file the pickle would create is not there."""
    marker = tmp_path / "the-pickle-ran"
    env = DistEnv(rank=0, world_size=2, master_addr="127.0.0.1", master_port=free_port(), hostname="node-a")
    caught: list[BaseException] = []

    def rank0():
        try:
            init_process_group(env, torch.device("cpu"), timeout_s=5, join_timeout_s=20)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            caught.append(e)

    thread = threading.Thread(target=rank0, daemon=True)
    thread.start()
    attacker = dist.TCPStore("127.0.0.1", env.master_port, 2, is_master=False, timeout=datetime.timedelta(seconds=20))
    key = "gptlaunch/rendezvous"
    attacker.set(f"{key}/rank/1", pickle.dumps(("node-b", CreatesAFile(str(marker)))))
    if attacker.add(f"{key}/joined", 1) == 2:
        attacker.set(f"{key}/full", b"")
    attacker.wait([f"{key}/verdict"])
    attacker.add(f"{key}/read", 1)
    attacker.set(f"{key}/all_read", b"")
    thread.join(30)
    assert not marker.exists(), "rank 0 unpickled the store entry"
    assert len(caught) == 1 and isinstance(caught[0], UserError), caught
    assert str(caught[0]) == (f"the rendezvous entry of rank(s) 1 at 127.0.0.1:{env.master_port} is not a gptlaunch "
                              "rank's (JSON [host, card]): refused, nothing was run from it; something else reaches "
                              "that port (see docs/security.md)")


def _rank(rank: int, world: int, port: int, out) -> None:
    """An honest exchange; then a crafted one through torch's own object collectives (the same two collectives, sizes
    then bytes): rank 1 sends a pickle into rank 0's gather_objects, and rank 0 one into rank 1's from_rank0_object."""
    torch.set_num_threads(1)
    marker = Path(os.environ["MARKER"])
    init_process_group(DistEnv(rank=rank, world_size=world, master_addr="127.0.0.1", master_port=port,
                               hostname=f"h{rank}"), torch.device("cpu"), timeout_s=30)
    honest = {"gather": gather_objects((rank, f"h{rank}")), "broadcast": from_rank0_object({"chosen": "step_4"})}
    if rank == 0:
        try:
            gather_objects("rank 0's")
        except NotPlainData as e:
            out["gather refused"] = str(e)
        box = [CreatesAFile(str(marker))]
        dist.broadcast_object_list(box, group_src=0)
    else:
        try:
            dist.all_gather_object([None, None], CreatesAFile(str(marker)))
        except Exception:  # noqa: BLE001 - what rank 0 sent is JSON, which the attacker's unpickling cannot read
            pass
        try:
            from_rank0_object(None)
        except NotPlainData as e:
            out["broadcast refused"] = str(e)
    out[rank] = honest
    leave()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_object_collectives_carry_json_and_refuse_a_peers_pickle(tmp_path, monkeypatch):
    marker = tmp_path / "the-pickle-ran"
    monkeypatch.setenv("MARKER", str(marker))
    got = spawn_ranks(_rank, 2)
    assert got[0] == got[1] == {"gather": [[0, "h0"], [1, "h1"]], "broadcast": {"chosen": "step_4"}}
    assert not marker.exists(), "a rank unpickled what a peer sent"
    assert got["gather refused"].startswith("rank 1 sent ") and got["gather refused"].endswith(
        " bytes that are not JSON (torch's object collectives would have unpickled them): refused")
    assert got["broadcast refused"].startswith("rank 0 sent ")


def test_one_process_gets_what_many_would():
    """Without other ranks the object still makes the JSON round trip, so what a single-process test sees is what a
    multi-rank job gets (tuples as lists), and something JSON cannot carry fails there too."""
    assert gather_objects((1, "a")) == [[1, "a"]]
    assert from_rank0_object({"a": (1.5, None)}) == {"a": [1.5, None]}
    with pytest.raises(TypeError):
        gather_objects({("s", "n"): 1})
