"""The process group: what a rank knows about its place in the job, and how it joins and leaves."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import json
import os
import socket
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from gpt.collectives.c10d_stderr import without_hostname_warning
from gpt.errors import UserError, error_line
from gpt.resilience.progress import PROGRESS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """A rank's coordinates, handed over by whichever launcher started it (see launch.rank.environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    hostname: str = socket.gethostname()
    # The GPU this rank drives, as an index among those it sees (None: its local rank); see
    # launch.rank.environment.device_index.
    device_index: int | None = None
    # Rank 0 only: a socket already listening on master_port, which the launcher bound when it chose the port (the
    # local backend's), so that no other process can take the port in between; None: the store binds it
    store_fd: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, env: DistEnv, share: bool = False) -> torch.device:
    """The device a rank computes on. `share` (debug.share_gpu): the ranks of a node take its GPUs in turn, several
    to one GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        count = torch.cuda.device_count()
        index = env.local_rank if env.device_index is None else env.device_index
        if share and count:
            index %= count
        if index >= count:
            # Two ranks on one GPU make NCCL fail later with "Duplicate GPU detected": say it now.
            raise UserError(f"rank {env.rank} should drive GPU {index} but sees {count} GPU(s) "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                            "run at most one rank per GPU (or debug.share_gpu=true, a debugging mode over gloo)")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        return device
    return torch.device(requested)


def process_group_backend(device: torch.device, share: bool = False) -> str:
    """gloo on CPU. On GPUs NCCL for device tensors plus gloo for host tensors: checkpoint agreement, flags and
    CPU-offloaded gradients then have a path too (an NCCL-only group accepts only CUDA tensors). Ranks that share a
    GPU (debug.share_gpu) use gloo for both: its CUDA collectives stage through the host, and NCCL is never
    started."""
    if device.type == "cuda" and not share:
        return "cpu:gloo,cuda:nccl"
    return "gloo"


class RendezvousError(UserError):
    """A rank could not join the job's process group in time: it names the rank, its host and what is missing."""


@dataclass(frozen=True)
class Rendezvous:
    """How a job's ranks met: who runs where, how long joining took, and a timed all_reduce (the preflight)."""

    world: int
    hosts: tuple[str, ...]  # hosts[rank] on rank 0, which alone reads every rank's entry; () on the others
    join_s: float
    all_reduce_bytes: int = 0
    all_reduce_ms: float = 0.0

    def by_host(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for rank, host in enumerate(self.hosts):
            out.setdefault(host, []).append(rank)
        return out

    def describe(self) -> str:
        hosts = "; ".join(f"{h}: {_ranges(r)}" for h, r in self.by_host().items())
        text = f"{self.world} rank(s) on {len(self.by_host())} host(s) joined in {self.join_s:.2f} s ({hosts})"
        if self.all_reduce_bytes:
            text += f"; all_reduce of {self.all_reduce_bytes / 2**10:.0f} KiB: {self.all_reduce_ms:.2f} ms"
        return text


def _span(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    parts: list[str] = []
    for i, rank in enumerate(ranks):
        if i and rank == ranks[i - 1] + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{rank}"
        else:
            parts.append(str(rank))
    return ",".join(parts) or "none"


def _ranges(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + _span(ranks)


_KEY = "gptlaunch/rendezvous"
# gloo connects a pair of ranks when they first exchange data, not every pair when a group is made: each rank of a
# group then opens sockets only to the peers its collectives talk to (2 for a ring, log2(W) for recursive doubling)
# and makes one store write at creation, where the full mesh costs W-1 sockets a rank and W^2 store reads a job.
GLOO_LAZY_INIT = "TORCH_GLOO_LAZY_INIT"
_GROUP_TIMEOUT: datetime.timedelta | None = None  # the default group's, once this rank joined one


Vet = Callable[[list[Any]], str | None]


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float = 600.0,
                       join_timeout_s: float | None = None, card: Any = None,
                       vet: Vet | None = None, share_gpu: bool = False) -> Rendezvous | None:
    """Join the job's process group: NCCL on GPUs, gloo on CPU (and on GPUs that ranks share: `share_gpu`). A
    single process joins nothing.

    Every rank first checks in at a TCP store on the master (rank 0): a rank that cannot reach it, or a
    rank 0 that does not see every rank within `join_timeout_s`, raises RendezvousError naming the rank,
    its host and the missing ranks, instead of hanging. `timeout_s` bounds collectives afterwards, on every group.

    Each rank leaves its `card` there too, as JSON (the store takes anyone who reaches the port, so rank 0 parses
    data and never unpickles), and rank 0 hands every card, in rank order, to `vet` before any backend starts: a
    line it returns stops every rank with that UserError, where NCCL would fail or hang (two ranks on one GPU:
    "Duplicate GPU detected"). An entry that is not a rank's JSON stops every rank too."""
    global _GROUP_TIMEOUT
    if not env.distributed:
        _refuse(vet([card]) if vet else None)
        return None
    start, join = time.monotonic(), float(join_timeout_s or timeout_s)
    store = _open_store(env, join)
    hosts, verdict = _meet(store, env, join, start, card, vet)
    _refuse(verdict)
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    os.environ.setdefault(GLOO_LAZY_INIT, "1")  # before any gloo group exists: read when its device is made
    _GROUP_TIMEOUT = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend=process_group_backend(device, share_gpu),
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=_GROUP_TIMEOUT,
        device_id=device if device.type == "cuda" and not share_gpu else None,  # binds NCCL's communicator
    )
    return Rendezvous(env.world_size, hosts, time.monotonic() - start)


def _open_store(env: DistEnv, join: float) -> Any:
    """This rank's client of the job's TCP store (rank 0 serves it, on the socket its launcher bound where one did,
    unless torch elastic's agent already does on the master port: a rank torchrun started)."""
    host_store = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        with without_hostname_warning():
            return dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=host_store,
                                 timeout=datetime.timedelta(seconds=join), wait_for_workers=False,
                                 master_listen_fd=env.store_fd if host_store else None)
    except (RuntimeError, OSError) as e:
        raise RendezvousError(f"rank {env.rank} on {env.hostname} could not {'open' if env.rank == 0 else 'reach'} "
                              f"the rendezvous at {env.master_addr}:{env.master_port} within {join:.0f} s: "
                              f"{error_line(e)}") from None


def _meet(store: Any, env: DistEnv, join: float, start: float, card: Any,
          vet: Vet | None) -> tuple[tuple[str, ...], str]:
    """Every rank checks in; rank 0 reads every entry at once, vets the cards and posts one verdict that every rank
    waits for. A rank makes a handful of store requests whatever the world size, and no rank polls: rank 0 reads
    W keys in one request, the others none of each other's. Returns (the hosts on rank 0, else (); the verdict)."""
    where, master = f"rank {env.rank} on {env.hostname}", f"{env.master_addr}:{env.master_port}"
    deadline = start + join
    try:
        with PROGRESS.collective("rendezvous"):
            _check_in(store, env, card)
            if env.is_main:
                return _judge(store, env, vet, join, deadline, where, master)
            return (), _await_verdict(store, env, join, deadline, where, master)
    except RendezvousError:
        raise
    except (RuntimeError, OSError) as e:
        raise RendezvousError(f"{where} lost the rendezvous at {master} while waiting for the other ranks: "
                              f"{error_line(e)}") from None


def _check_in(store: Any, env: DistEnv, card: Any) -> None:
    """This rank's entry (its host and card); the last rank in says that everyone is, so nobody polls the count."""
    store.set(f"{_KEY}/rank/{env.rank}", json.dumps([env.hostname, card]))
    if store.add(f"{_KEY}/joined", 1) == env.world_size:
        store.set(f"{_KEY}/full", b"")


def _left(deadline: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.01))


def _judge(store: Any, env: DistEnv, vet: Vet | None, join: float, deadline: float, where: str,
           master: str) -> tuple[tuple[str, ...], str]:
    """Rank 0: every rank's entry in one read once all are in, the cards vetted, the verdict posted ("": go on). A
    refusing rank 0 keeps the store (it serves it) until every rank has read the verdict, else they would see a
    lost rendezvous instead."""
    try:
        store.wait([f"{_KEY}/full"], _left(deadline))
    except dist.DistStoreError:
        # Only here, on rank 0 and when the job cannot start, a request per rank: which ones never came.
        missing = [r for r in range(env.world_size) if not store.check([f"{_KEY}/rank/{r}"])]
        raise RendezvousError(
            f"{where}: only {env.world_size - len(missing)} of {env.world_size} ranks joined the rendezvous at "
            f"{master} within {join:.0f} s; missing rank(s): {_span(missing)} (see their logs; raise "
            f"rendezvous.timeout_s if nodes start slowly)") from None
    entries = [_entry(e) for e in store.multi_get([f"{_KEY}/rank/{r}" for r in range(env.world_size)])]
    bad = [r for r, e in enumerate(entries) if e is None]
    if bad:
        verdict = (f"the rendezvous entry of rank(s) {_span(bad)} at {master} is not a gptlaunch rank's (JSON [host, "
                   "card]): refused, nothing was run from it; something else reaches that port (see docs/security.md)")
        entries = [e or ("?", None) for e in entries]
    else:
        verdict = (vet([c for _, c in entries]) if vet else None) or ""
    store.set(f"{_KEY}/verdict", verdict)
    if verdict:
        with contextlib.suppress(dist.DistStoreError):
            store.wait([f"{_KEY}/all_read"], _left(deadline))
    return tuple(h for h, _ in entries), verdict


def _entry(raw: bytes) -> tuple[str, Any] | None:
    """A rank's [host, card] as JSON; None for anything else."""
    try:
        host, card = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return (host, card) if isinstance(host, str) else None


def _await_verdict(store: Any, env: DistEnv, join: float, deadline: float, where: str, master: str) -> str:
    """Any rank but 0: rank 0's verdict, once it has seen every rank; a refusal is acknowledged (the last reader
    lets rank 0 go)."""
    try:
        store.wait([f"{_KEY}/verdict"], _left(deadline))
    except dist.DistStoreError:
        raise RendezvousError(f"{where}: {_why_no_verdict(store, env, master, join)} (raise rendezvous.timeout_s if "
                              "nodes start slowly)") from None
    verdict = store.get(f"{_KEY}/verdict").decode()
    if verdict and store.add(f"{_KEY}/read", 1) == env.world_size - 1:
        store.set(f"{_KEY}/all_read", b"")
    return verdict


def _why_no_verdict(store: Any, env: DistEnv, master: str, join: float) -> str:
    """What a rank but 0 can tell in two requests: how many came, and whether rank 0 did (it names the rest)."""
    joined = store.add(f"{_KEY}/joined", 0)
    if joined >= env.world_size:
        return f"every rank joined the rendezvous at {master}, but rank 0 did not answer within {join:.0f} s"
    missing = "rank 0's log names the missing ones" if store.check([f"{_KEY}/rank/0"]) else "rank 0 is missing"
    return f"only {joined} of {env.world_size} ranks joined the rendezvous at {master} within {join:.0f} s; {missing}"


def _refuse(line: str | None) -> None:
    if line:
        raise UserError(line)


def preflight(rendezvous: Rendezvous, device: torch.device, numel: int = 1 << 16, repeats: int = 3) -> Rendezvous:
    """Check the process group end to end before training: an all_reduce must return the right sum on every
    rank; time it (the median of `repeats`, after one warm-up)."""
    world = rendezvous.world
    tensor = torch.ones(numel, device=device)
    with PROGRESS.collective("all_reduce (preflight)"):
        dist.all_reduce(tensor)
    if float(tensor[0]) != world or float(tensor[-1]) != world:
        raise RuntimeError(f"preflight all_reduce returned {float(tensor[0])} instead of {world}")
    times = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        with PROGRESS.collective("all_reduce (preflight)"):
            dist.all_reduce(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return dataclasses.replace(rendezvous, all_reduce_bytes=tensor.numel() * tensor.element_size(),
                               all_reduce_ms=sorted(times)[len(times) // 2] * 1e3)


def leave() -> None:
    """Leave the process group once every rank is done, so no rank tears down while another still talks."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


# --- collectives: every one outside gpt/parallel/ goes through these -------------------------------------
# Each places its tensor on the group's communication device, so a value the host holds (a flag, a verdict, a
# figure) never reaches NCCL as a CPU tensor. tests/gpt/collectives/test_collectives.py fails on a collective elsewhere.

def is_multi(group: Any = None) -> bool:
    """Whether collectives on `group` (None: the default group) involve other ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _device_types(group: Any = None) -> set[str]:
    """The device types a group's backends take ("cpu:gloo,cuda:nccl": both)."""
    return {d.type for d in (group if group is not None else dist.group.WORLD)._device_types}


def comm_device(group: Any = None) -> torch.device:
    """The CPU when the group has a CPU backend (gloo, or gloo inside "cpu:gloo,cuda:nccl"): host values then
    need no device copy and no CUDA synchronisation. Otherwise (an NCCL-only group) the current GPU."""
    types = _device_types(group)
    if not types or "cpu" in types:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_values(values: Sequence[float], group: Any = None) -> list[float]:
    """Host floats summed over the ranks; one small collective."""
    if not is_multi(group):
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=comm_device(group))
    with PROGRESS.collective("all_reduce"):
        dist.all_reduce(t, group=group)
    return t.tolist()


def all_true(ok: bool, group: Any = None) -> bool:
    """True on every rank when `ok` is True on every rank."""
    return all_reduce_values([0.0 if ok else 1.0], group=group)[0] == 0


def any_true(flag: bool, group: Any = None) -> bool:
    """True on every rank when `flag` is True on any rank."""
    return all_reduce_values([1.0 if flag else 0.0], group=group)[0] > 0


def from_rank0(flag: bool, group: Any = None) -> bool:
    """Rank 0's `flag`, on every rank."""
    mine = flag and (not is_multi(group) or dist.get_rank(group) == 0)
    return any_true(mine, group)


def barrier(group: Any = None) -> None:
    """Every rank has reached this point (a tiny all_reduce on the group's communication device)."""
    if is_multi(group):
        all_reduce_values([0.0], group=group)


def gather_vectors(vector: Sequence[float], group: Any = None) -> list[list[float]]:
    """Every rank's vector of floats (all the same length), in rank order. A collective, not point-to-point
    exchanges, on the default group: a hang report reads that group's sequence numbers from torch's flight recorder
    (launch.recovery.flight_recorder), and gloo counts a send or a recv there without recording it, by different
    counts on different ranks under recursive doubling."""
    if not is_multi(group):
        return [[float(v) for v in vector]]
    # On GPUs, NCCL's leg: gloo's all_gather is a ring of TCP hops, a tenth of a second at 2,048 ranks at every log
    # step; the read back costs no extra synchronisation where the log step reads the loss anyway
    on_gpu = "nccl" in str(dist.get_backend(group))  # gloo takes CUDA tensors too: NCCL's, not any device type
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else comm_device(group)
    mine = torch.tensor(list(vector), dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    with PROGRESS.collective("all_gather"):
        dist.all_gather(out, mine, group=group)
    return [t.tolist() for t in out]


class NotPlainData(RuntimeError):
    """A peer sent something other than JSON where a rank expects plain data."""


def _plain(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def _parse(raw: bytes, sender: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise NotPlainData(f"{sender} sent {len(raw)} bytes that are not JSON (torch's object collectives would "
                           "have unpickled them): refused") from None


def _as_bytes(data: bytes, length: int, device: torch.device) -> torch.Tensor:
    """`data` (JSON, never empty) in a uint8 tensor of `length` bytes, zero-padded."""
    out = torch.zeros(length, dtype=torch.uint8, device=device)
    out[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def _text(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes()


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj`, in rank order, as JSON makes it (tuples come back as lists). torch's all_gather_object
    unpickles what a peer sends, which runs code a crafted peer names: this sends JSON and parses it, in the same two
    all_gathers (the sizes, then the bytes padded to the longest)."""
    data = _plain(obj)
    if not is_multi(group):
        return [json.loads(data)]
    device, world = comm_device(group), dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    with PROGRESS.collective("all_gather_object"):
        dist.all_gather(sizes, size, group=group)
        lengths = [int(s.item()) for s in sizes]
        mine = _as_bytes(data, max(lengths), device)
        out = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(out, mine, group=group)
    return [_parse(_text(t[:n]), f"rank {r}") for r, (t, n) in enumerate(zip(out, lengths))]


def from_rank0_object(obj: Any, group: Any = None) -> Any:
    """Rank 0's `obj` on every rank (a choice every rank must follow), as JSON makes it: one broadcast of its size
    and one of its bytes, so a rank receives one object, not every rank's, and parses it rather than unpickle it."""
    data = _plain(obj)
    if not is_multi(group):
        return json.loads(data)
    device = comm_device(group)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    with PROGRESS.collective("broadcast_object_list"):
        dist.broadcast(size, group=group, group_src=0)
        box = _as_bytes(data, int(size.item()), device) if dist.get_rank(group) == 0 else \
            torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        dist.broadcast(box, group=group, group_src=0)
    return _parse(_text(box), "rank 0")


def sum_over_ranks(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """`tensor` summed over the ranks (one collective), left on its device when the group serves that device
    (no host read: the caller reads it when it needs the values)."""
    if not is_multi(group):
        return tensor
    device = tensor.device if tensor.device.type in _device_types(group) else comm_device(group)
    out = tensor.detach().to(device, copy=True)
    with PROGRESS.collective("all_reduce"):
        dist.all_reduce(out, group=group)
    return out


def all_reduce_in_place(tensor: torch.Tensor, group: Any = None) -> None:
    """Sum `tensor` over the ranks where it lies, with no copy: for timing the collective itself (health's bus
    bandwidth). The caller puts it on a device the group serves."""
    if is_multi(group):
        with PROGRESS.collective("all_reduce"):
            dist.all_reduce(tensor, group=group)


def group_timeout() -> datetime.timedelta | None:
    """The collective timeout of every group this rank makes: the default group's (watchdog.collective_timeout_s),
    where torch would give a new group its own default (30 min on gloo), which outlasts the watchdog. None before
    init_process_group (torch's default)."""
    return _GROUP_TIMEOUT


def side_group(desc: str) -> Any:
    """A gloo group of its own, for work that runs beside training (the step's flags, async checkpoint writes):
    sharing the default group with the training loop crashes or hangs. "local" in a single process. Its pairs
    connect when first used (TORCH_GLOO_LAZY_INIT), so a rank holds sockets only to the peers it talks to."""
    if dist.is_available() and dist.is_initialized():
        return dist.new_group(backend="gloo", group_desc=desc, timeout=group_timeout())  # what hang reports call it
    return "local"


def subgroups(groups: Sequence[Sequence[int]], desc: str) -> Any:
    """This rank's group among the disjoint `groups` of global ranks (None when it is in none), made without a
    world-wide step per group. torch's new_group takes every rank into each group's creation; on a group bound to
    its GPU that is a split of the world's NCCL communicator per group. Here: bound to a GPU, one split makes them
    all (dist.split_group); otherwise only the members of this rank's group meet (use_local_synchronization: a
    member makes one store write, any other rank nothing). Every rank calls it alike, with the same groups."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    ranks = [sorted(g) for g in groups]
    if getattr(dist.group.WORLD, "bound_device_id", None) is not None:
        return dist.split_group(split_ranks=ranks, timeout=group_timeout(), group_desc=desc)
    mine = next((g for g in ranks if dist.get_rank() in g), None)
    if mine is None:
        return None
    return dist.new_group(mine, timeout=group_timeout(), group_desc=desc, use_local_synchronization=True)
