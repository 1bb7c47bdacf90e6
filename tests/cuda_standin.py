"""torch.cuda as CUDA documents it, for a machine without a GPU: the one stand-in every CPU test of a GPU path uses.

It is at least as strict as CUDA, so that a GPU-only fault shows up on the CPU:
- Work is enqueued on streams and finishes on a simulated device clock that only the test advances (`run`). The
  host never learns that work finished by itself: an event completes only when the host synchronises it, its
  stream or its device, or reads a True `query()`, and `query()` is True only once one of those made it so
  (CUDA may say True sooner, never later, so code that needs it sooner is wrong on a GPU too).
- `Event.elapsed_time` refuses, with CUDA's words, unless both events were made with `enable_timing=True`, were
  recorded, are on one device, and have completed.
- A stream's work reaches another stream only through `wait_stream`/`wait_event` (`visible`).
- Device selection is per thread, and a new thread starts on device 0, as CUDA's current device does. A stream's
  context (`torch.cuda.stream`) makes the stream's device current and, on leaving, sets the thread's device back, as
  torch's does (under CUDA 12 setting a device opens its context): every device a process touches is in `contexts`,
  and a rank given its GPU (`rank_gpu`, GPUs in exclusive-process mode, one per rank) fails on any other. Pinning
  host memory with DCP's cudaHostRegister opens a context on the current device too; `Tensor.pin_memory` uses a
  device that has one, as PyTorch's host allocator does; a copy to a CUDA device (`Tensor.to`) opens that device's
  (the copy stays on the CPU). A `non_blocking` copy into pinned host
  memory holds garbage until the host synchronises with its stream, as on a GPU.
- `CUDA_VISIBLE_DEVICES` (`visible`) is read as CUDA reads it: indices, GPU UUIDs or MIG slices (one MIG slice per
  process), renumbered 0..n-1 in the process; `physical` names the machine's GPU behind an index. `GpuNode` refuses
  two ranks on one GPU, as NCCL does, and `slurm_closest_tasks` shows each task of a node its GPUs as Slurm does under
  --gpu-bind=closest.
- The allocator's history (`torch.cuda.memory._record_memory_history`) takes only CUDA's settings, and a snapshot
  (`_dump_snapshot`) holds a trace only while it is recorded.
- The allocator gives out `capacity` bytes and no more: an allocation past it raises torch.OutOfMemoryError with
  CUDA's words, and leaves what was allocated as it was. `holding_saved_tensors` makes what autograd saves for the
  backward (the activations, which grow with the micro-batch) allocations of it while they are held, so that a step on
  the CPU runs out of memory where a GPU with that much memory would, in its forward.
- Memory statistics, random generator states, bf16 support, device names and properties answer for a device
  index that exists, and refuse another; `manual_seed` seeds the current device's generator only.
- `HostReads` counts each implicit read of a device tensor (`.item()`, `.tolist()`, `float(t)`, `bool(t)`, `int(t)`,
  `.cpu()`, `.numpy()`, a format) as the host wait it is on a GPU, with the code that made it: a tensor is the
  host's only where code puts it there (made from Python values or on "cpu", moved with `.cpu()`, or computed from
  host tensors alone).
- `GraphReplays` runs a module as CUDA graphs do: no host read or synchronisation while one is captured, and each
  replay overwrites the outputs of the one before.
- `NcclGroups` refuses, as NCCL does, a collective that hands a tensor moved to the host on purpose to a group that
  NCCL alone would serve on GPUs.

Tensors stay on the CPU: a GPU path under test takes its tensors' device from the test, and the timing, device
and memory calls from here. What only a GPU shows (kernels, NCCL, real overlap) is listed in docs/benchmarks.md.
"""
from __future__ import annotations

import contextlib
import pickle
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.cuda._pin_memory_utils as pin_memory_utils
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map


def index_of(device: Any, current: int) -> int:
    """The device index CUDA's calls take: an int, "cuda:1", torch.device("cuda", 1), or None (the current)."""
    if device is None:
        return current
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"Expected a cuda device, but got: {device}")
    return current if device.index is None else device.index


@dataclass(eq=False)
class Stream:
    """A queue of device work: `tail` is when its last enqueued work ends on the device clock, `done` how far the
    host knows it finished (only a synchronisation moves it)."""

    cuda: StrictCuda
    device: int
    tail: float = 0.0
    done: float = 0.0
    seen: dict[int, float] = field(default_factory=dict)  # id(other stream): how far this one waited for it
    copies: list[tuple[float, Any]] = field(default_factory=list)  # (ends at, fill the host destination)

    def synchronize(self) -> None:
        self.cuda.host_wait()
        self.reach(self.tail)

    def reach(self, at: float) -> None:
        """The host learnt that the stream got to `at`: what it copied into host memory until then is there."""
        self.done = max(self.done, at)
        for copy in [c for c in self.copies if c[0] <= self.done]:
            self.copies.remove(copy)
            copy[1]()

    def query(self) -> bool:
        return self.done >= self.tail

    def wait_stream(self, other: Stream) -> None:
        self.wait_until(other, other.tail)

    def wait_event(self, event: Any) -> None:
        event.wait(self)

    def wait_until(self, other: Stream, at: float) -> None:
        self.tail = max(self.tail, at)
        self.seen[id(other)] = max(self.seen.get(id(other), 0.0), at)

    def record_event(self, event: Any = None) -> Any:
        event = event or self.cuda.Event()
        event.record(self)
        return event


class StrictCuda:
    """The parts of torch.cuda the project calls, installed over torch.cuda by `install` for one test."""
    MEMORY = 80 << 30  # each device's

    def __init__(self, devices: int = 1, name: str = "NVIDIA H100 80GB HBM3", bf16: bool = True,
                 clock_khz: int = 1_980_000, visible: str | None = None, mig: bool = False,
                 rank_gpu: int | None = None, capacity: int = MEMORY):
        """`devices` GPUs in the machine (MIG slices with `mig`), of which the process enumerates those
        CUDA_VISIBLE_DEVICES=`visible` names; `rank_gpu`: the one index this rank may open a context on."""
        self.uuids = [f"{'MIG' if mig else 'GPU'}-{i:08x}-0000-0000-0000-000000000000" for i in range(devices)]
        self.shown = enumerated(self.uuids, visible)
        devices = len(self.shown)
        self.rank_gpu, self.capacity = rank_gpu, capacity
        self.count, self.name, self.bf16, self.clock_khz = devices, name, bf16, clock_khz
        self.default_streams = [Stream(self, i) for i in range(devices)]
        self.streams: list[Stream] = list(self.default_streams)
        self.thread = threading.local()
        self.host_waits = 0  # synchronisations of an event, a stream or a device: the host blocked on the GPU
        self.capturing = False  # a CUDA graph is being captured (GraphReplays)
        self.contexts: set[int] = set()  # devices touched: each one a CUDA context (about 0.5 GB) in this process
        self.pinned: dict[int, int] = {}  # host memory pinned: address -> bytes
        self.memory = {"allocated": 0, "peak": 0, "reserved": 0}
        self.history: list[dict[str, Any]] | None = None  # the allocator's history, while it is recorded
        self.rng_states = [torch.zeros(16, dtype=torch.uint8) for _ in range(devices)]  # CUDA's: seed and offset
        self.Event = self._event_class()

    # --- devices ------------------------------------------------------------------------------------------
    def is_available(self) -> bool:
        return self.count > 0

    def device_count(self) -> int:
        return self.count

    def current_device(self) -> int:
        return getattr(self.thread, "device", 0)

    def _checked(self, device: Any) -> int:
        index = index_of(device, self.current_device())
        if not 0 <= index < self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        if self.rank_gpu is not None and index != self.rank_gpu:  # another rank's, in exclusive-process mode
            raise RuntimeError("CUDA error: CUDA-capable device(s) is/are busy or unavailable")
        self.contexts.add(index)
        return index

    def physical(self, index: int) -> int:
        """The machine's GPU (its place in `uuids`) that this process's device `index` is."""
        return self.shown[index]

    def set_device(self, device: Any) -> None:
        index = index_of(device, self.current_device())
        self.thread.device = self._checked(index)

    def get_device_name(self, device: Any = None) -> str:
        self._checked(device)
        return self.name

    def get_device_properties(self, device: Any = None) -> SimpleNamespace:
        self._checked(device)
        return SimpleNamespace(name=self.name, clock_rate=self.clock_khz, total_memory=self.MEMORY)

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return self.bf16 or including_emulation

    # --- streams and device work ------------------------------------------------------------------------------
    def current_stream(self, device: Any = None) -> Stream:
        index = self._checked(device)
        return self.thread.__dict__.get("streams", {}).get(index) or self.default_streams[index]

    def Stream(self, device: Any = None) -> Stream:  # noqa: N802 (torch.cuda.Stream)
        stream = Stream(self, self._checked(device))
        self.streams.append(stream)
        return stream

    @contextlib.contextmanager
    def stream(self, stream: Stream | None):
        """torch.cuda.stream: work enqueued inside goes to `stream` (this thread's current stream meanwhile). As
        torch's StreamContext: entering makes the stream's device the thread's current one (torch.cuda.set_stream
        does), and leaving sets the device it found back, opening a context there: a thread that never chose its
        device leaves on device 0."""
        if stream is None:
            yield None
            return
        found = self.current_device()
        streams = self.thread.__dict__.setdefault("streams", {})
        before = streams.get(stream.device)
        self.set_device(stream.device)
        streams[stream.device] = stream
        try:
            yield stream
        finally:
            streams[stream.device] = before
            self.set_device(found)

    def run(self, seconds: float, stream: Stream | None = None) -> None:
        """Enqueue `seconds` of device work on `stream` (the current one)."""
        (stream or self.current_stream()).tail += seconds

    def _sleep(self, cycles: int) -> None:
        self.run(cycles / (self.clock_khz * 1e3))

    def synchronize(self, device: Any = None) -> None:
        index = self._checked(device)
        self.host_wait()
        for stream in self.streams:
            if stream.device == index:
                stream.reach(stream.tail)

    def host_wait(self, what: str = "a synchronisation") -> None:
        """The host waits for the device: refused while a CUDA graph is captured, as CUDA refuses it."""
        if self.capturing:
            raise RuntimeError(f"CUDA error: operation not permitted when stream is capturing ({what})")
        self.host_waits += 1

    def visible(self, writer: Stream, at: float, reader: Stream) -> bool:
        """Whether work `writer` enqueued up to `at` is visible to work enqueued now on `reader`."""
        return reader is writer or writer.done >= at or reader.seen.get(id(writer), -1.0) >= at

    # --- random generators ------------------------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        state = torch.zeros(16, dtype=torch.uint8)
        state[:8] = torch.tensor(list(int(seed).to_bytes(8, "little")), dtype=torch.uint8)
        self.rng_states[self._checked(None)] = state

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        return self.rng_states[self._checked(device)].clone()

    def set_rng_state(self, new_state: torch.Tensor, device: Any = "cuda") -> None:
        if new_state.dtype != torch.uint8:
            raise TypeError("RNG state must be a torch.ByteTensor")
        self.rng_states[self._checked(device)] = new_state.clone()

    # --- memory -----------------------------------------------------------------------------------------------
    def memory_allocated(self, device: Any = None) -> int:
        self._checked(device)
        return self.memory["allocated"]

    def max_memory_allocated(self, device: Any = None) -> int:
        self._checked(device)
        return self.memory["peak"]

    def memory_reserved(self, device: Any = None) -> int:
        self._checked(device)
        return self.memory["reserved"]

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self._checked(device)
        self.memory["peak"] = self.memory["allocated"]

    def allocate(self, nbytes: int) -> None:
        """The caching allocator's malloc on the current device: refused past `capacity`, as CUDA refuses."""
        index, mem = self._checked(None), self.memory
        if mem["allocated"] + nbytes > self.capacity:
            gib, mib = 1 << 30, 1 << 20
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {nbytes / mib:.2f} MiB. GPU {index} has a total capacity of "
                f"{self.capacity / gib:.2f} GiB of which {(self.capacity - mem['allocated']) / mib:.2f} MiB is free. "
                f"Of the allocated memory {mem['allocated'] / gib:.2f} GiB is allocated by PyTorch, and 0 bytes is "
                "reserved by PyTorch but unallocated.")
        mem["allocated"] += nbytes
        mem["reserved"] = max(mem["reserved"], mem["allocated"])
        mem["peak"] = max(mem["peak"], mem["allocated"])

    def release(self, nbytes: int) -> None:
        self.memory["allocated"] -= nbytes

    @contextlib.contextmanager
    def holding_saved_tensors(self):
        """Inside, in this thread (and a process forked from it), each tensor autograd saves for the backward is
        allocated here while it is held: through torch.autograd.graph.saved_tensors_hooks, composed with any that
        code enters inside (the trainer measures a step's activations with its own), where a pack that keeps no
        tensor (activation checkpointing's) holds nothing."""
        cuda, plain = self, torch.autograd.graph.saved_tensors_hooks

        class Held:
            nbytes = 0  # an allocation refused holds nothing

            def __init__(self, kept: Any):
                if isinstance(kept, torch.Tensor):
                    cuda.allocate(kept.nbytes)
                    self.nbytes = kept.nbytes
                self.kept = kept

            def __del__(self):
                cuda.release(self.nbytes)

        class Holding(plain):
            def __init__(self, pack_hook: Any, unpack_hook: Any):
                super().__init__(lambda t: Held(pack_hook(t)), lambda held: unpack_hook(held.kept))

        torch.autograd.graph.saved_tensors_hooks = Holding
        try:
            with Holding(lambda t: t, lambda t: t):
                yield self
        finally:
            torch.autograd.graph.saved_tensors_hooks = plain

    def pin_memory(self, ptr: int, size: int) -> None:
        """torch.cuda._pin_memory_utils.pin_memory (cudaHostRegister): in the current device's context."""
        self._checked(None)
        self.pinned[ptr] = size

    def pin_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Tensor.pin_memory: a page-locked copy. PyTorch's host allocator allocates it in a device's context that
        exists already (pytorch#21081), and opens one on the current device only where none does."""
        if not self.contexts:
            self._checked(None)
        pinned = tensor.clone()
        self.pinned[pinned.data_ptr()] = pinned.nbytes
        return pinned

    def to_device(self, to: Any) -> Any:
        """Tensor.to over `to` (torch's): a copy to a CUDA device opens a context there, and no other (torch's device
        guard sets the thread's device back only where it has a context); the tensor stays on the CPU, a copy of its
        own, as a GPU copy would be."""
        def moved(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **{k: v for k, v in kwargs.items() if k != "copy"})
            if device is None or device.type != "cuda":
                return to(tensor, *args, **kwargs)
            self._checked(device)
            return to(tensor, "cpu", dtype=dtype, copy=True)
        return moved

    def copy_to_host(self, copy: Any) -> Any:
        """Tensor.copy_ and UntypedStorage.copy_ over `copy` (torch's): a non_blocking copy into pinned host memory
        is device work on the current stream, and the destination holds garbage (all bits set: NaN) until the host
        learns that the stream got there (a synchronisation of it, its device or a later event)."""
        def copied(dst: Any, src: Any, non_blocking: bool = False) -> Any:
            storage = dst if isinstance(dst, torch.UntypedStorage) else dst.untyped_storage()
            if not (non_blocking and storage.data_ptr() in self.pinned):
                return copy(dst, src, non_blocking)
            stream = self.current_stream()
            stream.tail += 1e-6  # the copy's own time on the device
            source = src.clone()  # what the device reads now
            stream.copies.append((stream.tail, lambda: copy(dst, source, False)))
            storage.fill_(0xFF)
            return dst
        return copied

    def unpin_memory(self, ptr: int) -> None:
        if self.pinned.pop(ptr, None) is None:
            raise RuntimeError("CUDA error: host memory not registered")

    def _record_memory_history(self, enabled: str | None = "all", context: str | None = "all", stacks: str = "all",
                               max_entries: int = 2**63 - 1, **kwargs: Any) -> None:
        """torch.cuda.memory._record_memory_history: CUDA's allocator keeps a history of allocations and frees from
        now on (refused without a device, or with a setting CUDA does not take)."""
        if enabled not in (None, "state", "all") or context not in (None, "state", "alloc", "all") or \
                stacks not in ("python", "all") or max_entries <= 0:
            raise ValueError(f"invalid memory history setting: enabled={enabled!r}, context={context!r}, "
                             f"stacks={stacks!r}, max_entries={max_entries}")
        self._checked(None)
        self.history = [] if enabled == "all" else None

    def _dump_snapshot(self, filename: str = "dump_snapshot.pickle", augment_with_fx_traces: bool = False) -> None:
        """torch.cuda.memory._dump_snapshot: the allocator's state pickled; its trace holds the history only while
        recording, as CUDA's does (an empty trace otherwise)."""
        self._checked(None)
        snapshot = {"segments": [], "device_traces": [list(self.history or []) for _ in range(self.count)]}
        with open(filename, "wb") as f:
            pickle.dump(snapshot, f)

    def _event_class(self) -> type:
        cuda = self

        class Event:
            """torch.cuda.Event: recorded on a stream, complete once the host knows its stream got there."""

            def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
                self.enable_timing = enable_timing
                self.stream: Stream | None = None
                self.at = 0.0

            def record(self, stream: Stream | None = None) -> None:
                stream = stream or cuda.current_stream()
                if self.stream is not None and self.stream.device != stream.device:
                    raise RuntimeError(f"Event device {self.stream.device} does not match recording stream's "
                                       f"device {stream.device}.")
                self.stream, self.at = stream, stream.tail

            def query(self) -> bool:
                return self.stream is None or self.stream.done >= self.at

            def synchronize(self) -> None:
                cuda.host_wait()
                if self.stream is not None:
                    self.stream.reach(self.at)

            def wait(self, stream: Stream | None = None) -> None:
                if self.stream is not None:
                    (stream or cuda.current_stream()).wait_until(self.stream, self.at)

            def elapsed_time(self, end: Event) -> float:
                if not (self.enable_timing and end.enable_timing):
                    raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
                if self.stream is None or end.stream is None:
                    raise RuntimeError("Both events must be recorded before calculating elapsed time.")
                if self.stream.device != end.stream.device:
                    raise RuntimeError("Both events must be recorded on the same device.")
                if not (self.query() and end.query()):
                    raise RuntimeError("Both events must be completed before calculating elapsed time.")
                return (end.at - self.at) * 1e3

        return Event

    # --- installing -------------------------------------------------------------------------------------------
    NAMES = ("is_available", "device_count", "current_device", "set_device", "get_device_name",
             "get_device_properties", "is_bf16_supported", "current_stream", "Stream", "stream", "Event", "synchronize",
             "_sleep", "memory_allocated", "max_memory_allocated", "memory_reserved", "reset_peak_memory_stats",
             "manual_seed", "get_rng_state", "set_rng_state")

    MEMORY_NAMES = ("_record_memory_history", "_dump_snapshot")  # torch.cuda.memory's
    PIN_NAMES = ("pin_memory", "unpin_memory")  # torch.cuda._pin_memory_utils' (DCP's staging pins with them)

    def install(self, monkeypatch: Any) -> StrictCuda:
        import launch.local_gpus

        # the machine's device files and the driver's NVML, which the launcher reads instead of torch
        files = [f"/dev/nvidia{i}" for i in range(len(self.uuids))]
        real_glob = launch.local_gpus.glob.glob
        monkeypatch.setattr(launch.local_gpus.glob, "glob",
                            lambda pattern, **kw: files if pattern == "/dev/nvidia[0-9]*" else real_glob(pattern, **kw))
        StrictNvml([self.MEMORY] * len(self.uuids)).install(monkeypatch)  # NVML lists every GPU of the machine
        for name in self.NAMES:
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        for name in self.MEMORY_NAMES:
            monkeypatch.setattr(torch.cuda.memory, name, getattr(self, name))
        for name in self.PIN_NAMES:
            monkeypatch.setattr(pin_memory_utils, name, getattr(self, name))
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, device=None: self.pin_tensor(tensor))
        monkeypatch.setattr(torch.Tensor, "to", self.to_device(torch.Tensor.to))
        for kind in (torch.Tensor, torch.UntypedStorage):
            monkeypatch.setattr(kind, "copy_", self.copy_to_host(kind.copy_))
        return self


def enumerated(uuids: list[str], spec: str | None) -> list[int]:
    """The machine's devices (places in `uuids`) a process enumerates under CUDA_VISIBLE_DEVICES=`spec`, in order,
    as CUDA reads it: indices by their leading digits, or UUIDs (a unique prefix each), the first entry's kind, up to
    the first entry that names no device (-1 ends it); a device named twice: none at all; of MIG slices one alone."""
    if spec is None:
        return list(range(len(uuids)))
    chosen: list[int] = []
    uuid = spec.strip().startswith(("GPU-", "MIG-"))
    for entry in (e.strip() for e in spec.split(",")):
        digits = entry[:len(entry) - len(entry.lstrip("0123456789"))]
        named = [i for i, u in enumerate(uuids) if u.startswith(entry)] if uuid else \
            [int(digits)] if digits and int(digits) < len(uuids) else []
        if len(named) != 1:
            break
        if named[0] in chosen:
            return []
        chosen.append(named[0])
    return chosen[:1] if chosen and uuids[chosen[0]].startswith("MIG-") else chosen


class GpuNode:
    """The GPUs of one node, as NCCL checks them when a communicator starts: one rank per GPU."""

    def __init__(self):
        self.owners: dict[int, int] = {}  # the machine's GPU -> the rank on it

    def claim(self, rank: int, gpu: int) -> None:
        if gpu in self.owners:
            raise RuntimeError(f"NCCL error: invalid usage: Duplicate GPU detected : rank {rank} and rank "
                               f"{self.owners[gpu]} both on CUDA device {gpu}")
        self.owners[gpu] = rank


def slurm_closest_tasks(gpus: int = 8, sockets: int = 2, distribution: str | None = None,
                        uuids: list[str] | None = None) -> list[dict[str, str]]:
    """Each task's variables on one node of a Slurm step of one task per GPU under --gpu-bind=closest, as Slurm
    sets them: the tasks placed on the sockets in turn (srun's default distribution, block:cyclic: local ids 0, 2, 4,
    ... on the first of two sockets), or socket after socket with `distribution` "*:block" (then SLURM_DISTRIBUTION
    is set); each shown its socket's GPUs, by index or by `uuids` (SLURM_STEP_GPUS by index)."""
    per_socket = gpus // sockets
    block = distribution is not None and distribution.split(":")[1:2] == ["block"]
    tasks = []
    for local in range(gpus):
        socket = local // per_socket if block else local % sockets
        shown = range(socket * per_socket, (socket + 1) * per_socket)
        names = ",".join(uuids[g] if uuids else str(g) for g in shown)
        tasks.append({"SLURM_LOCALID": str(local), "CUDA_VISIBLE_DEVICES": names,
                      "SLURM_STEP_GPUS": ",".join(map(str, shown)),
                      "SLURM_GPUS_ON_NODE": str(gpus), **({"SLURM_DISTRIBUTION": distribution} if distribution else {})})
    return tasks


class StrictNvml:
    """The NVML calls the launcher makes (nvidia-ml-py's pynvml), as the driver's library answers them: nothing
    before nvmlInit or after nvmlShutdown, no handle for an index it does not have, UUIDs as str."""

    def __init__(self, memory: list[int]):
        import pynvml

        self.nvml, self.memory, self.inits = pynvml, memory, 0

    def _ready(self) -> None:
        if self.inits == 0:
            raise self.nvml.NVMLError(self.nvml.NVML_ERROR_UNINITIALIZED)

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self._ready()
        self.inits -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._ready()
        return len(self.memory)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._ready()
        if not 0 <= index < len(self.memory):
            raise self.nvml.NVMLError(self.nvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        self._ready()
        return f"GPU-{handle:08x}-0000-0000-0000-000000000000"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        self._ready()
        return SimpleNamespace(total=self.memory[handle], free=self.memory[handle], used=0)

    def install(self, monkeypatch: Any) -> StrictNvml:
        import pynvml

        for name in ("nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex",
                     "nvmlDeviceGetUUID", "nvmlDeviceGetMemoryInfo"):
            monkeypatch.setattr(pynvml, name, getattr(self, name))
        return self


class NcclGroups:
    """The groups a GPU run would give NCCL alone, and NCCL's refusal of a host tensor on one of them, for a CPU run.

    On GPUs the default group is "cpu:gloo,cuda:nccl" and a side group gloo (gpt.collectives.process_group), both of
    which take host tensors; a group split from the GPU-bound default one (process_group.subgroups, a device mesh's
    dimensions) is NCCL alone, which refuses a CPU tensor. On the CPU every tensor is a CPU tensor, so this marks the
    ones code moves to the host on purpose (`.cpu()`, `.to("cpu")`; a torch.device passed along is the run's own, the
    CPU only because the test runs there, and torch's factories are left alone, as TorchScript compiles calls to
    them) and refuses, with torch's words, a collective that hands one to a group other than the default one or a
    gloo side group."""

    COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast",
                   "reduce_scatter_tensor", "reduce_scatter", "send", "recv")  # not isend/irecv: P2POp takes only torch's own

    def __init__(self) -> None:
        self.host_only: set[int] = set()  # id() of the groups made for gloo alone
        self.refused: list[str] = []

    def install(self, monkeypatch: Any) -> NcclGroups:
        import torch.distributed as dist

        for name in self.COLLECTIVES:
            monkeypatch.setattr(dist, name, self._checked(name, getattr(dist, name)))
        monkeypatch.setattr(dist, "new_group", self._recording(dist.new_group))
        cpu, to = torch.Tensor.cpu, torch.Tensor.to
        monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: self._host(t, cpu(t, *a, **k)))
        monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: self._host(t, to(t, *a, **k))
                            if _to_host(*a, **k) else to(t, *a, **k))
        return self

    @staticmethod
    def _host(source: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out = out.clone() if out is source else out  # a GPU tensor's copy, not the tensor itself
        out._host_placed = True
        return out

    def _recording(self, new_group: Any) -> Any:
        def made(*args: Any, **kwargs: Any) -> Any:
            group = new_group(*args, **kwargs)
            if kwargs.get("backend") == "gloo":
                self.host_only.add(id(group))
            return group
        return made

    def nccl_alone(self, group: Any) -> bool:
        import torch.distributed as dist

        return group is not None and group is not dist.group.WORLD and id(group) not in self.host_only

    def _checked(self, name: str, collective: Any) -> Any:
        def checked(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, list) else [a])
                       if isinstance(t, torch.Tensor)]
            if self.nccl_alone(group) and any(getattr(t, "_host_placed", False) for t in tensors):
                self.refused.append(name)
                raise RuntimeError(f"{name}: No backend type associated with device type cpu (a host tensor on a "
                                   "group NCCL alone serves)")
            return collective(*args, **kwargs)
        return checked


class GraphReplays:
    """A module compiled into CUDA graphs (train.compile_mode=reduce-overhead), as CUDA runs them: the first call for
    each input shape captures (with `HostReads` refusing any host read or synchronisation meanwhile), and every call
    returns the same output tensors, which the next call with that shape overwrites in place."""

    def __init__(self, cuda: StrictCuda, module: Any):
        self.cuda, self.module, self.outputs = cuda, module, {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args) + tuple(sorted(kwargs.items()))
        if key not in self.outputs:
            self.cuda.capturing = True
            try:
                with HostReads(self.cuda):
                    captured = self.module(*args, **kwargs)
            finally:
                self.cuda.capturing = False
            self.outputs[key] = tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, captured)
            return self.outputs[key]
        replayed, static = tree_flatten(self.module(*args, **kwargs))[0], tree_flatten(self.outputs[key])[0]
        for out, new in zip(static, replayed):
            if isinstance(out, torch.Tensor):
                out.copy_(new.detach())
        return self.outputs[key]


class HostReads(TorchFunctionMode):
    """Inside (this thread), each implicit read of a device tensor is a host wait of `cuda` (`host_waits`), its
    place in the project's code in `sites`. A GPU run's tensors are the device's unless code makes them the host's:
    from Python values without a device or with "cpu" (torch.tensor, torch.zeros(3)), with `.cpu()`/`.to("cpu")`,
    or computed from host tensors alone; a torch.device passed is the run's own (the CPU only because the test runs
    there). Tensors made before entering, by autograd, or in another thread are the device's."""

    READS = {"item", "tolist", "__float__", "__bool__", "__int__", "__index__", "__format__", "numpy", "cpu"}

    def __init__(self, cuda: StrictCuda):
        super().__init__()
        self.cuda, self.sites = cuda, []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        to_host = name == "cpu" or name == "to" and _to_host(*args[1:], **kwargs)
        if (name in self.READS or to_host) and inputs and not getattr(inputs[0], "_host_placed", False):
            self.sites.append(f"{name} at {_project_caller()}")
            self.cuda.host_wait(self.sites[-1])
        out = func(*args, **kwargs)
        if to_host and out is inputs[0]:
            out = out.clone()  # a copy of the device tensor on a GPU, not the tensor itself
        device = kwargs.get("device")
        host = to_host or (all(getattr(t, "_host_placed", False) for t in inputs) and
                           (device is None and not any(isinstance(a, torch.device) for a in args) or
                            _names_host(device)))
        if host:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    t._host_placed = True
        return out


def _project_caller() -> str:
    """The innermost frame of the project's code (gpt/, launch/) on the stack, as path:line."""
    import traceback

    frames = [f for f in traceback.extract_stack() if "/gpt/" in f.filename or "/launch/" in f.filename]
    return f"{frames[-1].filename.rsplit('/', 2)[-2]}/{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" \
        if frames else "?"


def _names_host(device: Any) -> bool:
    """Whether code names the host itself ("cpu", "cpu:0"), rather than passing a device it was given (a run's
    torch.device, which is the CPU only because the test runs there)."""
    return isinstance(device, str) and device.split(":")[0] == "cpu"


def _to_host(*args: Any, **kwargs: Any) -> bool:
    """Whether Tensor.to(ARGS) names the host."""
    return _names_host(kwargs.get("device", next((a for a in args if isinstance(a, str)), None)))
