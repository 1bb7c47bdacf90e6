"""A rank built as rank r of its planned world in this one process, on torch's fake process group (one process is
rank r of W and every collective does nothing): the real DeviceMesh, fully_shard, parallelize_module and pipeline
split run at that rank's real shapes, as gpt.train.build builds them in a rank. On a CPU the model is built on the
meta device (real shapes, no memory, no values); on a GPU at real size, where the allocator counts what it holds.

What the rank holds is read from its tensors as the rank's own first-step record reads them (gpt.parallel.memory_held):
its parameters, the gradients its update reads (zero-filled, each shaped and typed as its parameter is held: a DTensor's
local shard, a pipeline rank's stages, a replica's whole model; DDP's reducer buckets where held beside them) and its
optimizer state after one step on them. No forward runs, so no activations. `python -m launch.dry_run` prints these
beside the fit check's estimate."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt.collectives.process_group import DistEnv
from gpt.config.model import ModelConfig
from gpt.config.schema import RunConfig
from gpt.parallel.base import Strategy
from gpt.parallel.memory_held import tensor_bytes
from gpt.train.build import build_strategy_and_model

META = torch.device("meta")


@dataclass(frozen=True)
class BuiltRank:
    """Bytes one rank held, built on the fake process group."""

    rank: int
    device: str  # where its model was built: "meta", or the GPU's at real size
    layout: str  # the strategy's own description of how it wrapped the model
    params: int
    grads: int
    optimizer: int
    allocated: int | None = None  # on a GPU, the allocator's bytes in use after the step
    peak: int | None = None  # on a GPU, the allocator's peak over the build and the step


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """This process as rank `rank` of `world_size` on torch's fake process group, left on exit (so that the next
    rank can be built in the same process)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():  # a one-process world another build left in this process (gpt.parallel.mesh)
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def zero_grad_step(strategy: Strategy) -> int:
    """Give every parameter the rank holds a zero gradient shaped and typed as the parameter, and step each of its
    optimizers once: their state exists from the first step. Returns the gradients' bytes as the update reads
    them. On the meta device the step runs unfused: the fused kernel has no meta implementation, and the unfused
    step creates the same state (AdamW's two moments like each parameter, and a step count)."""
    for p in strategy.held_parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    grads = tensor_bytes(strategy.held_gradients()) + strategy.gradient_buffer_bytes()
    for _, optimizer in strategy.state_parts():
        if any(p.is_meta for group in optimizer.param_groups for p in group["params"]):
            for group in optimizer.param_groups:
                group.update(fused=False, foreach=False)
        optimizer.step()
    return grads


def build_rank(run: RunConfig, model_cfg: ModelConfig, env: DistEnv, device: torch.device) -> BuiltRank:
    """Rank env.rank of env.world_size as gpt.train.build builds it, on the fake process group: on the meta device
    for a CPU `device`, at real size on a GPU. The run's initial weights are not loaded (values change nothing a rank
    holds)."""
    run = dataclasses.replace(run, init="none")
    on_gpu = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if on_gpu else 0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    with fake_world(env.rank, env.world_size):
        strategy = build_strategy_and_model(run, model_cfg, env, device, model_device=None if on_gpu else META)
        grads = zero_grad_step(strategy)
        built = BuiltRank(env.rank, str(device) if on_gpu else "meta", strategy.describe(),
                          tensor_bytes(strategy.held_parameters()), grads,
                          tensor_bytes(strategy.held_optimizer_state()))
        if on_gpu:
            built = dataclasses.replace(built, allocated=torch.cuda.memory_allocated(device) - before,
                                        peak=torch.cuda.max_memory_allocated(device) - before)
        del strategy  # before the next rank's build: its tensors, and on a GPU their memory, go now
        gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return built
