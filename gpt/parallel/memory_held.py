"""What one rank holds in memory, by part, measured during its first step from the tensors themselves: the parameters,
gradients and optimizer state the strategy says it holds (Strategy.held_*: exact, each tensor once, a DTensor's local
shard; DDP's reducer buckets where held beside the gradients), the tensors autograd saved for backward (activations) and
the most parameters a strategy gathered at once (FSDP's and ZeRO-3's unsharded layers), and the peak: the allocator's on
a GPU; on a CPU, which has no allocator peak, the sum of the parts. Compared with the planner's estimate
(gpt.parallel.memory_estimate) by benchmarks/memory_fit.py."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from gpt.parallel.base import Strategy
from gpt.parallel.memory_estimate import MemoryParts
from gpt.train.hooks import LoopHook


def local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor that holds `t`'s memory: a DTensor's local shard, and inside a wrapper subclass (torchao's
    float8-castable weights of train.fp8_all_gather), which has no storage of its own, the tensor it wraps."""
    t = t.to_local() if hasattr(t, "to_local") else t
    while is_traceable_wrapper_subclass(t):
        inner, _ = t.__tensor_flatten__()
        t = getattr(t, inner[0])
    return t


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


class MeasuredStep:
    """Measures what the rank holds during the step run inside it (`parts`, once the step is done): gradients just
    before the update (after clipping, when all exist), optimizer state after it, activations as saved by one
    micro-step (each frees its own in its backward)."""

    def __init__(self, strategy: Strategy, n_micro: int):
        self.strategy, self.n_micro = strategy, n_micro
        self.parts: MemoryParts | None = None

    def __enter__(self) -> MeasuredStep:
        strategy = self.strategy
        self.params = list(strategy.held_parameters())
        self.grads: list[int] = []
        self.before_update = before_update = strategy.before_update

        def read_grads() -> None:
            self.grads.append(tensor_bytes(strategy.held_gradients()) + strategy.gradient_buffer_bytes())
            before_update()

        if strategy.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(strategy.device)
        self.saved = SavedForBackward(self.params, [module for module, _ in strategy.state_parts()])
        strategy.before_update = read_grads
        self.saved.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        strategy, device = self.strategy, self.strategy.device
        try:
            self.saved.__exit__(kind, *exc)
        finally:
            strategy.before_update = self.before_update
        if kind is not None:
            return
        if not self.grads:  # a strategy calls it before every update (a background save's staging waits there too)
            raise RuntimeError(f"{type(strategy).__name__} updated its weights without calling before_update()")
        activations = self.saved.bytes / self.n_micro + self.saved.gathered
        parts = (tensor_bytes(self.params), self.grads[0], tensor_bytes(strategy.held_optimizer_state()), activations)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else sum(parts)
        self.parts = MemoryParts(*parts, peak=peak)


class FirstStepMemory(LoopHook):
    """The loop's hook that measures the attempt's first step, and hands what the rank holds to `report` after it."""

    def __init__(self, strategy: Strategy, n_micro: int, report: Callable[[int, MemoryParts], None]):
        self.strategy, self.n_micro, self.report = strategy, n_micro, report
        self.first: MeasuredStep | None = None
        self.reported = False

    def around_step(self, step: int) -> contextlib.AbstractContextManager:
        if self.first is not None:
            return contextlib.nullcontext()
        self.first = MeasuredStep(self.strategy, self.n_micro)
        return self.first

    def after_step(self, step: int) -> None:
        if self.first is not None and not self.reported:
            self.reported = True
            self.report(step, self.first.parts)
