"""Every random number generator a rank draws from, captured and restored, so a resumed run draws the same
dropout masks (and anything else random) as the run that never stopped."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this rank's own GPU only: a resume may see fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # written before: every visible GPU's state; ours is the current one's
        index = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def reseed(seed: int, step: int, rank: int) -> None:
    """A fresh, reproducible stream for a rank that has no saved state of its own (the world size changed)."""
    mixed = hash((seed, step, rank)) % 2**31
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def seed_device(seed: int, rank: int) -> None:
    """A CUDA stream of this rank's own: dropout masks then differ between data-parallel replicas."""
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed + 1_000_003 * (rank + 1))
