"""What an asynchronous save copies, and into what. DCP writes a tensor that several ranks hold alike (a replicated
model under ddp or zero1, a pipeline stage's replicas) once, from one of them; the copy made before writing must not
be any larger: each rank stages only the tensors it will write. A CPU run's copies touch no GPU."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._state_dict_stager import StateDictStager
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
from torch.distributed.tensor import DTensor

from gpt.dist.process_group import gather_objects

State = dict[str, dict[str, Any]]  # {"model": {name: value}, "optim": {name: value}}


def plain_tensor_bytes(state: State) -> dict[tuple[str, str], int]:
    """{(section, name): bytes} of the plain tensors of `state`: what ranks may hold alike (a DTensor's shards
    differ from rank to rank)."""
    return {(section, name): value.nbytes for section, values in state.items() for name, value in values.items()
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor)}


def assign_writers(held: list[dict[tuple[str, str], int]]) -> dict[tuple[str, str], int]:
    """Each plain tensor's writer among the ranks that hold it (`held[rank]`): the one with the fewest bytes so far,
    so that replicated state is spread over its holders, as DCP's planner spreads its writes."""
    load = [0] * len(held)
    writer = {}
    for key in sorted({k for h in held for k in h}):
        holders = [rank for rank, h in enumerate(held) if key in h]
        writer[key] = min(holders, key=lambda rank: (load[rank], rank))
        load[writer[key]] += held[writer[key]][key]
    return writer


def this_ranks_share(state: State, group: dist.ProcessGroup | None) -> State:
    """`state` without the plain tensors another rank writes (agreed in one all_gather_object over `group`);
    DTensor shards and non-tensor values stay."""
    held: list[dict[tuple[str, str], int]] = gather_objects(plain_tensor_bytes(state), group)
    writer, rank = assign_writers(held), dist.get_rank(group)
    return {section: {name: value for name, value in values.items() if writer.get((section, name), rank) == rank}
            for section, values in state.items()}


def local_bytes(value: Any) -> int:
    """Bytes of the part of `value` this rank holds (0 for a non-tensor)."""
    if isinstance(value, DTensor):
        value = value.to_local()
    return value.nbytes if isinstance(value, torch.Tensor) else 0


class CpuStager(AsyncStager):
    """Copies a CPU run's state in a background thread into plain CPU memory. DefaultStager makes a stream on the
    machine's accelerator (and pins memory) whenever one exists, which opens a CUDA context on a GPU host even
    for a run on the CPU."""

    _synchronize_after_execute = False

    def __init__(self):
        self.copier = StateDictStager(pin_memory=False, share_memory=False)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-staging")

    def stage(self, state_dict: State) -> Future:
        return self.executor.submit(self.copier.stage, state_dict)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.copier.close()


class ShareStager(AsyncStager):
    """Stages this rank's share of the state (this_ranks_share) with `inner`; what it stages is what DCP saves."""

    _synchronize_after_execute = False

    def __init__(self, inner: AsyncStager, group: dist.ProcessGroup | None):
        self.inner, self.group = inner, group
        self.staged_bytes = 0  # of the last save's tensors, on this rank

    def stage(self, state_dict: State) -> Future:
        if dist.is_initialized():
            state_dict = this_ranks_share(state_dict, self.group)
        self.staged_bytes = sum(local_bytes(value) for values in state_dict.values() for value in values.values())
        return self.inner.stage(state_dict)

    def close(self) -> None:
        """DCP's call, ignored: torch 2.11's async_save closes the stager it is given once its save is written
        (later versions leave a caller's stager to the caller), and a closed one fails the next save (seen on a GPU:
        `KeyError: <class 'type'>` from the closed copier's emptied table, at the second save of every DCP
        strategy). This one lives from the first asynchronous save to shutdown()."""

    def shutdown(self) -> None:
        self.inner.close()


def make_stager(device: torch.device, group: dist.ProcessGroup | None) -> ShareStager:
    """The stager of a run on `device`, agreeing on writers over `group`. On CUDA, DefaultStager copies into
    pinned buffers it keeps and reuses from one save to the next (allocating 1.65 GB anew each time cost more than
    copying it), non-blocking, on a stream of its own; on the CPU, CpuStager."""
    if device.type == "cuda":
        inner = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=True,
                                             use_non_blocking_copy=True))
    else:
        inner = CpuStager()
    return ShareStager(inner, group)
