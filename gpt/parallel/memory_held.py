"""What one rank holds in memory, by part, measured during its first step from the tensors themselves: the parameters,
gradients and optimizer state the strategy says it holds (Strategy.held_*: exact, each tensor once, a DTensor's local
shard; DDP's reducer buckets with the gradients), the tensors autograd saved for backward (activations) and the most
parameters a strategy gathered at once (FSDP's and ZeRO-3's unsharded layers), and the peak: the allocator's on a
GPU; on a CPU, which has no allocator peak, the sum of the parts. Compared with the planner's estimate
(gpt.parallel.memory_estimate) by benchmarks/memory_fit.py."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from gpt.parallel.base import StepResult, Strategy
from gpt.parallel.memory_estimate import MemoryParts


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of `tensors`, each once (a DTensor: its local shard, without the padding its storage may have). A meta
    tensor (a dry run, gpt.train.dry_build) has no address to tell copies by: each tensor object counts once."""
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        if t is not None:
            whole, t = t, local(t)
            seen[(id(whole), -1) if t.is_meta else (t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


class SavedForBackward:
    """The distinct storages autograd saves for backward inside this context, parameters left out: those the rank
    holds and those a strategy gathers for the forward (FSDP's and ZeRO-3's unsharded layers, the modules'
    parameters at that moment). `gathered`: the most gathered parameters alive at once, as each save finds them
    (FSDP frees a layer's after its forward, though autograd saved them: only those alive count)."""

    def __init__(self, held: Iterable[torch.Tensor], modules: list[torch.nn.Module]):
        self.params = {local(p).untyped_storage().data_ptr() for p in held}
        self.modules = modules
        self.saved: dict[int, int] = {}
        self.gathered = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        current = (local(p).untyped_storage() for m in self.modules for p in m.parameters())
        gathered = {s.data_ptr(): s.nbytes() for s in current if s.data_ptr() not in self.params}
        self.gathered = max(self.gathered, sum(gathered.values()))
        storage = local(t).untyped_storage()
        if storage.data_ptr() not in self.params and storage.data_ptr() not in gathered:
            self.saved[storage.data_ptr()] = max(self.saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())

    def __enter__(self) -> SavedForBackward:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)


def measure_step(strategy: Strategy, n_micro: int, step: Callable[[], StepResult]) -> tuple[StepResult, MemoryParts]:
    """Run one step (`step`) and measure what the rank holds: gradients just before the update (after clipping,
    when all exist), optimizer state after it, activations as saved by one micro-step (each frees its own in its
    backward)."""
    device = strategy.device
    params = list(strategy.held_parameters())
    grads: list[int] = []
    before_update = strategy.before_update

    def read_grads() -> None:
        grads.append(tensor_bytes(strategy.held_gradients()) + strategy.gradient_buffer_bytes())
        before_update()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    strategy.before_update = read_grads
    try:
        with SavedForBackward(params, [module for module, _ in strategy.state_parts()]) as saved:
            result = step()
    finally:
        strategy.before_update = before_update
    if not grads:  # a strategy calls it before every update (the checkpointer's background save waits there too)
        raise RuntimeError(f"{type(strategy).__name__} updated its weights without calling before_update()")
    activations = saved.bytes / n_micro + saved.gathered
    parts = (tensor_bytes(params), grads[0], tensor_bytes(strategy.held_optimizer_state()), activations)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else sum(parts)
    return result, MemoryParts(*parts, peak=peak)
