"""What pipeline stages send each other: under bf16 autocast the hidden states go forward, and their gradients back, in
bf16, not in the fp32 of the residual stream (gpt.parallel.pipeline.StageGPT), in training and in evaluation."""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from helpers import compose, spawn_ranks
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.train.build import build_strategy_and_model


def _rank(rank: int, world: int, port: int, out: dict) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.set_num_threads(1)
    launch_config.register()
    cfg = launch_config.parse(compose("model=tiny", "model.vocab_size=64", "strategy=pipeline", "train.device=cpu",
                                      "strategy.microbatches=2", "cluster.tasks_per_node=2",
                                      "train.precision=bf16"))
    strategy = build_strategy_and_model(cfg, cfg.model, DistEnv(rank=rank, world_size=world), torch.device("cpu"))
    sent, real = [], dist.P2POp

    def recording(op, tensor, *args, **kwargs):
        if op in (dist.isend, dist.send) and tensor.is_floating_point():
            sent.append(tensor.dtype)
        return real(op, tensor, *args, **kwargs)

    evaluated, send, recv = [], dist.send, dist.recv

    def sending(tensor, *args, **kwargs):
        if tensor.is_floating_point():
            evaluated.append(("sent", str(tensor.dtype)))
        return send(tensor, *args, **kwargs)

    def receiving(tensor, *args, **kwargs):
        if tensor.is_floating_point():
            evaluated.append(("received", str(tensor.dtype)))
        return recv(tensor, *args, **kwargs)

    dist.P2POp, dist.send, dist.recv = recording, sending, receiving
    try:
        x = torch.randint(0, 64, (4, 16))
        strategy.train_step([(x, x)], 1, 1e-3, 1.0)
        loss = strategy.forward_loss(x, x)  # evaluation: the stages in turn, outside the schedule
    finally:
        dist.P2POp, dist.send, dist.recv = real, send, recv
    out[rank] = sorted({str(dtype) for dtype in sent}), evaluated, bool(torch.isfinite(loss))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stages_send_hidden_states_and_their_gradients_in_bf16_under_bf16_autocast():
    got = spawn_ranks(_rank, 2)
    # training: rank 0 sends hidden states, rank 1 their gradients; evaluation: the hidden states alone
    assert got == {0: (["torch.bfloat16"], [("sent", "torch.bfloat16")], True),
                   1: (["torch.bfloat16"], [("received", "torch.bfloat16")], True)}
