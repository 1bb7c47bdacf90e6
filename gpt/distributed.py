"""The process group: what a rank knows about its place in the job, and how it joins and leaves."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """A rank's coordinates, handed over by whichever launcher started it (see launch.environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    hostname: str = socket.gethostname()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, env: DistEnv) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device(requested)


class RendezvousError(UserError):
    """A rank could not join the job's process group in time: it names the rank, its host and what is missing."""


@dataclass(frozen=True)
class Rendezvous:
    """How a job's ranks met: who runs where, how long joining took, and a timed all_reduce (the preflight)."""

    hosts: tuple[str, ...]  # hosts[rank]
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
        text = f"{len(self.hosts)} rank(s) on {len(self.by_host())} host(s) joined in {self.join_s:.2f} s ({hosts})"
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


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float = 600.0,
                       join_timeout_s: float | None = None) -> Rendezvous | None:
    """Join the job's process group: NCCL on GPUs, gloo on CPU. A single process joins nothing.

    Every rank first checks in at a TCP store on the master (rank 0): a rank that cannot reach it, or a
    rank 0 that does not see every rank within `join_timeout_s`, raises RendezvousError naming the rank,
    its host and the missing ranks, instead of hanging. `timeout_s` bounds collectives afterwards."""
    if not env.distributed:
        return None
    join = float(join_timeout_s or timeout_s)
    where = f"rank {env.rank} on {env.hostname}"
    master = f"{env.master_addr}:{env.master_port}"
    start = time.monotonic()
    # Under torch elastic (the local backend) the agent already serves a store on the master port.
    host_store = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=host_store,
                              timeout=datetime.timedelta(seconds=join), wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        raise RendezvousError(f"{where} could not {'open' if env.rank == 0 else 'reach'} the rendezvous at "
                              f"{master} within {join:.0f} s: {_first_line(e)}") from None
    try:
        store.set(f"{_KEY}/host/{env.rank}", env.hostname)
        joined = store.add(f"{_KEY}/joined", 1)
        while joined < env.world_size:
            if time.monotonic() - start > join:
                missing = [r for r in range(env.world_size) if not store.check([f"{_KEY}/host/{r}"])]
                raise RendezvousError(
                    f"{where}: only {joined} of {env.world_size} ranks joined the rendezvous at {master} within "
                    f"{join:.0f} s; missing rank(s): {_span(missing)} (see their logs; raise "
                    f"rendezvous.timeout_s if nodes start slowly)")
            time.sleep(0.02)
            joined = store.add(f"{_KEY}/joined", 0)
        hosts = tuple(store.get(f"{_KEY}/host/{r}").decode() for r in range(env.world_size))
    except RendezvousError:
        raise
    except (RuntimeError, OSError) as e:
        raise RendezvousError(f"{where} lost the rendezvous at {master} while waiting for the other ranks: "
                              f"{_first_line(e)}") from None
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return Rendezvous(hosts, time.monotonic() - start)


def preflight(rendezvous: Rendezvous, device: torch.device, numel: int = 1 << 16, repeats: int = 3) -> Rendezvous:
    """Check the process group end to end before training: an all_reduce must return the right sum on every
    rank; time it (the median of `repeats`, after one warm-up)."""
    world = len(rendezvous.hosts)
    tensor = torch.ones(numel, device=device)
    dist.all_reduce(tensor)
    if float(tensor[0]) != world or float(tensor[-1]) != world:
        raise RuntimeError(f"preflight all_reduce returned {float(tensor[0])} instead of {world}")
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return dataclasses.replace(rendezvous, all_reduce_bytes=tensor.numel() * tensor.element_size(),
                               all_reduce_ms=sorted(times)[len(times) // 2] * 1e3)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def leave() -> None:
    """Leave the process group once every rank is done, so no rank tears down while another still talks."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
