"""What an asynchronous save copies, and into what. DCP writes a tensor that several ranks hold alike (a replicated
model under ddp or zero1, a pipeline stage's replicas) once, from one of them; the copy made before writing must not
be any larger: each rank stages only the tensors it will write. A CPU run's copies touch no GPU."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._state_dict_stager import StateDictStager
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from gpt.collectives.process_group import all_true, gather_objects

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


class Writers:
    """Which rank writes each plain tensor, agreed over `group` in one all_gather_object of every rank's list of
    plain tensors, and kept: a run saves the same tensors at the same sizes each time (an optimizer's first step
    adds its moments), and that gather brings every rank's list to every rank (tens of MB each on 2,048 ranks).
    Each save asks in one all_reduce of a flag whether any rank's tensors changed: every rank gathers again, or
    none does (a rank that gathered alone would wait for the others)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.held: dict[tuple[str, str], int] | None = None  # this rank's plain tensors when the ranks last agreed
        self.writer: dict[tuple[str, str], int] = {}

    def of(self, state: State) -> dict[tuple[str, str], int]:
        held = plain_tensor_bytes(state)
        if not all_true(held == self.held, self.group):
            rows = gather_objects([[s, n, b] for (s, n), b in held.items()], self.group)  # JSON: no tuple keys
            self.writer = assign_writers([{(s, n): b for s, n, b in mine} for mine in rows])
            self.held = held
        return self.writer

    def share(self, state: State) -> State:
        """`state` without the plain tensors another rank writes; DTensor shards and non-tensor values stay."""
        writer, rank = self.of(state), dist.get_rank(self.group)
        return {section: {name: value for name, value in values.items() if writer.get((section, name), rank) == rank}
                for section, values in state.items()}


def local_bytes(value: Any) -> int:
    """Bytes of the part of `value` this rank holds (0 for a non-tensor)."""
    if isinstance(value, DTensor):
        value = value.to_local()
    return value.nbytes if isinstance(value, torch.Tensor) else 0


class BackgroundStager(AsyncStager):
    """Copies the state in a background thread with DCP's StateDictStager, into host buffers it keeps from one save
    to the next: on CUDA pinned, copied non-blocking on a stream of its own once the step that made the state is
    done. DefaultStager does this, but torch 2.11's closes its copier after every save, which frees those buffers
    and empties the copier's tables (the next save fails `KeyError: <class 'type'>`, seen on an H100 at the second
    save of every DCP strategy); and on a CPU run it makes a stream on the machine's accelerator, opening a CUDA
    context on a GPU host."""

    _synchronize_after_execute = False

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.copier = StateDictStager(pin_memory=cuda, share_memory=False)
        self.stream = torch.cuda.Stream(device) if cuda else None  # made here: the writer thread starts on GPU 0
        # The thread takes the rank's GPU before any CUDA call: else its first call (at the latest the exit of
        # torch.cuda.stream, which sets the device it found back) opens a context on GPU 0 in every rank, about
        # 0.5 GB each, and fails where GPUs are in exclusive-process mode.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-staging",
                                           initializer=torch.cuda.set_device if cuda else None,
                                           initargs=(self.stream.device,) if cuda else ())

    def stage(self, state_dict: State) -> Future:
        step_done = torch.cuda.current_stream(self.stream.device).record_event() if self.stream else None
        return self.executor.submit(self._copy, state_dict, step_done)

    def _copy(self, state_dict: State, step_done: Any) -> State:
        if self.stream is None:
            return self.copier.stage(state_dict)
        self.stream.wait_event(step_done)
        with torch.cuda.stream(self.stream):
            staged = self.copier.stage(state_dict, non_blocking=True)
        self.stream.synchronize()
        return staged

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.copier.close()


class ShareStager(AsyncStager):
    """Stages this rank's share of the state (Writers.share) with `inner`; what it stages is what DCP saves."""

    _synchronize_after_execute = False

    def __init__(self, inner: AsyncStager, group: dist.ProcessGroup | None):
        self.inner, self.writers = inner, Writers(group)
        self.staged_bytes = 0  # of the last save's tensors, on this rank

    def stage(self, state_dict: State) -> Future:
        if dist.is_initialized():
            state_dict = self.writers.share(state_dict)
        self.staged_bytes = sum(local_bytes(value) for values in state_dict.values() for value in values.values())
        return self.inner.stage(state_dict)

    def close(self) -> None:
        """At the run's end: DCP leaves a stager it is given to the caller, which reuses it from save to save."""
        self.inner.close()


def make_stager(device: torch.device, group: dist.ProcessGroup | None) -> ShareStager:
    """The stager of a run on `device`, agreeing on writers over `group`."""
    return ShareStager(BackgroundStager(device), group)
