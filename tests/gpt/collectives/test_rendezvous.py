"""The rendezvous preflight: a rank that cannot join, or a world that never fills, is an error naming the rank
and its host within the timeout, never a hang."""
from __future__ import annotations

import time

import pytest
import torch

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
