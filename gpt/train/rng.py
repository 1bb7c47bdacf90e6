"""Every random number generator a rank draws from, captured and restored, so a resumed run draws the same
dropout masks (and anything else random) as the run that never stopped; and the seed of the generator dropout
draws from on the run's device.

Dropout streams: the ranks of one tensor-parallel group hold the same activations wherever those are replicated
(the residual stream, the embeddings' output), so they must drop the same elements, or their copies drift apart
(and with them the replicated norm weights). Data-parallel replicas and pipeline stages draw streams of their own.
The CPU generator is seeded per stream as a GPU's is, so CPU runs draw masks per stream as GPU runs do. Under tensor
parallelism the ranks of a group then also share the stream where activations are sharded (attention's dropout
on each rank's heads, sequence-parallel slices): their masks are alike there, as plain-tensor dropout gives with
torchtitan's seeding; they stay valid masks, only correlated across the group's shards.

Nothing here touches CUDA unless the run's device is a GPU: a CPU run on a GPU host opens no CUDA context."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def stream_index(rank: int, tp: int) -> int:
    """The dropout stream of `rank`: one per tensor-parallel group, whose ranks are tp consecutive ranks (tp is
    the innermost axis of every strategy's mesh, gpt.parallel.layout)."""
    return rank // tp


def _device_seed(seed: int, stream: int) -> int:
    return seed + 1_000_003 * (stream + 1)


def seed_device(seed: int, stream: int, device: torch.device) -> None:
    """Seed the generator dropout draws from on `device` (a GPU's own, or the CPU's) for dropout stream `stream`."""
    if device.type == "cuda":  # the current device: the rank's own (gpt.collectives.process_group.pick_device)
        torch.cuda.manual_seed(_device_seed(seed, stream))
    else:
        torch.default_generator.manual_seed(_device_seed(seed, stream))


def capture(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":  # this rank's own GPU only: a resume may see fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type != "cuda":
        return
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # written before: every visible GPU's state; ours is at our index
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def reseed(seed: int, step: int, stream: int, device: torch.device) -> None:
    """A fresh, reproducible stream for a rank that has no saved state of its own (the world size changed); the
    ranks of a tensor-parallel group (one `stream`) get the same one."""
    mixed = hash((seed, step, stream)) % 2**31
    random.seed(mixed)
    np.random.seed(mixed)
    torch.default_generator.manual_seed(mixed)
    if device.type == "cuda":
        seed_device(mixed, stream, device)
