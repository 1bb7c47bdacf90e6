"""What a rank pays to start as the world grows: the store requests, sockets and files it opens to join the job and
to make and first use its gloo groups, at 8 to 4,096 simulated ranks against one real TCPStore, each figure fitted
against the world size W (constant, log2 W or W) and projected to 8,192 ranks (1,024 nodes x 8 GPUs).

    python benchmarks/startup_scale.py [--ranks 8 16 32 ... 4096] [--per-process 512] [--gloo-up-to 2048]

Each size plays every rank through gptlaunch's own code, without training:
- the job's TCPStore is served by a process of its own, as rank 0 (or torch elastic's agent) serves it;
- rank 0 is a process of its own and the other ranks threads of a few more (--per-process ranks each), so that
  rank 0's files are told apart from the others';
- every rank joins through gpt.collectives.process_group.init_process_group, its store client wrapped to count
  the requests made through it and the keys they read, and torch's init_process_group replaced by the gloo backend
  it would make (the NCCL side cannot run here): the rendezvous, then the default group's gloo side;
- then what each gloo group's first use connects, one group at a time, each closed before the next: the
  preflight's ring all-reduce on the default group, one sum of the step's flags (the recursive doubling of
  gpt.collectives.flag_sum) on a group made as side_group makes it, and one gather to rank 0 (DCP's coordinator)
  on the async checkpoint's group;
- files from /proc/PID/fd before and after each phase (sockets apart), per rank;
- the group creations a rank takes part in for the health check's node groups (8 ranks a node) and the pipeline's
  tie groups (pp=4), through gpt.collectives.process_group.subgroups on torch's fake process group, beside
  torch's new_subgroups_by_enumeration (what the health check called before).
Past --gloo-up-to ranks the gloo groups of every simulated rank would not fit this machine's memory (GLOO_UP_TO):
those sizes measure the rendezvous and the store server alone. On this 2-core machine the sizes take their time
(thousands of threads); the figures are counts, not timings. Writes benchmarks/results/startup_scale.json.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# torch's store sockets log every connection, which costs a reverse lookup of each address: quiet, and where the
# resolver is slow to fail (this machine's: 5 s per lookup), thousands of connections would wait on it. Every
# simulated rank is on this host: gloo binds the loopback without looking up the host's name.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
ONE_HOST = {"RES_OPTIONS": "timeout:1 attempts:1", "GLOO_SOCKET_IFNAME": "lo"}

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import save_results  # noqa: E402
from benchmarks.control_plane import fit_growth  # noqa: E402
from gpt.collectives import process_group  # noqa: E402
from gpt.collectives.flag_sum import doubling_rounds  # noqa: E402
from launch.rank.open_files import raise_open_files  # noqa: E402

RANKS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
PROJECT = 8192  # 1,024 nodes x 8 GPUs
PHASES = ("rendezvous", "default group", "step flags group", "async checkpoint group")
TIMEOUT = datetime.timedelta(seconds=600)
RANKS_PER_NODE, PIPELINE_STAGES = 8, 4
AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"
THREAD_STACK = 512 << 10
# Past this size the simulated ranks' gloo groups outgrow this machine's memory (24 GiB): gloo keeps state for every
# peer of a group, connected or not (about 1.4 KiB: 5.7 MiB a group at 4,096 ranks), and each of the W ranks
# here holds one; larger sizes measure the rendezvous alone.
GLOO_UP_TO = 2048  # thousands of Python threads: a small stack each


class CountingStore(dist.Store):
    """A store client that counts the requests made through it and the keys they read, whoever makes them (the
    rendezvous in Python, gloo's C++ through torch's trampoline)."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.requests: collections.Counter[str] = collections.Counter()
        self.keys_read = 0

    def _count(self, op: str, keys_read: int = 0) -> None:
        self.requests[op] += 1
        self.keys_read += keys_read

    def set(self, key, value):
        self._count("set")
        return self.inner.set(key, value)

    def get(self, key):
        self._count("get", 1)
        return self.inner.get(key)

    def multi_get(self, keys):
        self._count("multi_get", len(keys))
        return self.inner.multi_get(keys)

    def multi_set(self, keys, values):
        self._count("multi_set")
        return self.inner.multi_set(keys, values)

    def add(self, key, amount):
        self._count("add")
        return self.inner.add(key, amount)

    def compare_set(self, key, expected, desired):
        self._count("compare_set")
        return self.inner.compare_set(key, expected, desired)

    def check(self, keys):
        self._count("check")
        return self.inner.check(keys)

    def wait(self, keys, timeout=None):
        self._count("wait")
        return self.inner.wait(keys) if timeout is None else self.inner.wait(keys, timeout)

    def delete_key(self, key):
        self._count("delete_key")
        return self.inner.delete_key(key)

    def num_keys(self):
        self._count("num_keys")
        return self.inner.num_keys()

    def set_timeout(self, timeout):
        self.inner.set_timeout(timeout)

    def snapshot(self) -> tuple[int, int]:
        return sum(self.requests.values()), self.keys_read


def open_files(pid: int | str = "self") -> collections.Counter[str]:
    """A process's open files by kind: 'socket' and 'other' (pipes, epoll, files)."""
    out: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out["socket" if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") else "other"] += 1
        except OSError:  # closed while listed
            pass
    return out


def _serve(conn: Any) -> None:
    """The job's store, served from a process of its own until told to stop."""
    os.environ.update(ONE_HOST)
    raise_open_files()
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    conn.send(store.port)
    conn.recv()


@dataclass
class Rank:
    """One simulated rank: its counted store client, its gloo groups, and what it spent in each phase."""

    rank: int
    world: int
    store: CountingStore | None = None
    group: Any = None
    spent: dict[str, tuple[int, int]] = field(default_factory=dict)  # phase: (requests, keys read)
    error: str = ""


@contextmanager
def playing(ranks: dict[int, Rank], gloo: bool = True) -> Iterator[None]:
    """gpt.collectives.process_group with the store client counted, the store served elsewhere (as torch elastic's
    agent serves it), and torch's init_process_group replaced by the gloo backend it makes for the default group
    (one per simulated rank: torch's is one per process), or by nothing without `gloo`."""
    real_store, real_init, agent = dist.TCPStore, dist.init_process_group, os.environ.get(AGENT_STORE)

    def store(*args: Any, **kwargs: Any) -> CountingStore:
        return CountingStore(real_store(*args, **kwargs))

    def init(backend: str, store: CountingStore, rank: int, world_size: int, timeout: datetime.timedelta,
             **_: Any) -> None:
        me = ranks[rank]
        me.store, me.spent["rendezvous"] = store, store.snapshot()
        if gloo:
            me.group = dist.ProcessGroupGloo(dist.PrefixStore("0/cpu/", store), rank, world_size, timeout)

    dist.TCPStore, dist.init_process_group, os.environ[AGENT_STORE] = store, init, "True"
    try:
        yield
    finally:
        dist.TCPStore, dist.init_process_group = real_store, real_init
        if agent is None:
            del os.environ[AGENT_STORE]
        else:
            os.environ[AGENT_STORE] = agent


def join_in_threads(ranks: dict[int, Rank], port: int, gloo: bool = True) -> None:
    """Ranks `ranks` join the job whose store listens on `port` (served elsewhere), each a thread of this process,
    and make the default group's gloo side unless not `gloo`; each rank's `spent["rendezvous"]` is then what its
    rendezvous cost."""
    with playing(ranks, gloo):
        _each(ranks, lambda me: _join(me, port))


def _join(me: Rank, port: int) -> None:
    env = process_group.DistEnv(rank=me.rank, world_size=me.world, master_addr="127.0.0.1", master_port=port,
                                hostname=f"node{me.rank // RANKS_PER_NODE}")
    process_group.init_process_group(env, torch.device("cpu"), TIMEOUT.total_seconds(), join_timeout_s=600,
                                     card=me.rank % RANKS_PER_NODE, vet=lambda cards: None)


def _ring(me: Rank) -> None:
    me.group.allreduce([torch.ones(4)]).wait()  # the preflight's all-reduce (gloo's ring)


def _side_group(me: Rank, name: str) -> None:
    """A world-wide gloo group, as process_group.side_group's new_group makes it."""
    me.group = dist.ProcessGroupGloo(dist.PrefixStore(f"{name}/cpu/", me.store), me.rank, me.world, TIMEOUT)


def _flags(me: Rank) -> None:
    """One sum of the step's flags: gpt.collectives.flag_sum's rounds, on the backend itself."""
    _side_group(me, "step_flags")
    values, incoming = torch.zeros(4, dtype=torch.float64), torch.empty(4, dtype=torch.float64)
    for op, peer in doubling_rounds(me.rank, me.world):
        works = ([me.group.send([values], peer, 0)] if op in ("send", "swap") else []) + \
                ([me.group.recv([incoming], peer, 0)] if op in ("recv", "swap") else [])
        for work in works:
            work.wait()


def _gather(me: Rank) -> None:
    """One gather to rank 0 on the async checkpoint's group (DCP's coordinator collects every rank's plan)."""
    _side_group(me, "async_checkpoint")
    opts = dist.GatherOptions()
    opts.rootRank = 0
    out = [[torch.empty(1) for _ in range(me.world)]] if me.rank == 0 else []
    me.group.gather(out, [torch.ones(1)], opts).wait()


def _each(ranks: dict[int, Rank], work: Callable[[Rank], None]) -> None:
    """`work` on every rank of this process at once, one thread each; a rank's error is kept, not raised."""
    def run(me: Rank) -> None:
        try:
            work(me)
        except Exception as e:  # noqa: BLE001  reported with the figures
            me.error = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=run, args=(me,), daemon=True) for me in ranks.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _barrier(sync: Any, name: str, processes: int) -> None:
    """Every process of this size at `name` (over the harness's own store client, which nothing counts)."""
    if sync.add(f"barrier/{name}", 1) == processes:
        sync.set(f"barrier/{name}/go", b"")
    sync.wait([f"barrier/{name}/go"])


def _spent(ranks: dict[int, Rank], phase: str, since: dict[int, tuple[int, int]]) -> None:
    for me in ranks.values():
        now = me.store.snapshot()
        me.spent[phase] = (now[0] - since[me.rank][0], now[1] - since[me.rank][1])


def _rss_kib() -> int:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0])


def _play(world: int, mine: list[int], port: int, processes: int, gloo: bool, conn: Any) -> None:
    """Ranks `mine` of `world`, as threads of this process: join, then (with `gloo`) each gloo group's first use,
    one at a time. Sends each rank's store costs per phase, and this process's files per phase and memory."""
    raise_open_files()  # as the rank does where it starts
    os.environ.update(ONE_HOST)
    os.environ.pop(process_group.GLOO_LAZY_INIT, None)  # gptlaunch's code decides, as in a fresh rank
    threading.stack_size(THREAD_STACK)
    sync = dist.TCPStore("127.0.0.1", port, 1, False, timeout=TIMEOUT)
    ranks = {r: Rank(r, world) for r in mine}
    files: dict[str, collections.Counter[str]] = {"start": open_files()}
    rss = _rss_kib()
    join_in_threads(ranks, port, gloo)
    files["default group"], rss = open_files(), _rss_kib() - rss
    if gloo:
        _first_uses(ranks, files, sync, processes)
    conn.send({"ranks": {r: (me.spent, me.error) for r, me in ranks.items()},
               "files": {k: dict(v) for k, v in files.items()}, "memory_kib": rss})
    conn.recv()  # the store clients stay open until the server's files are counted


def _first_uses(ranks: dict[int, Rank], files: dict[str, collections.Counter[str]], sync: Any,
                processes: int) -> None:
    """Each gloo group's first use, one group at a time, each closed before the next is made."""
    steps = (("default group", _ring), ("step flags group", _flags), ("async checkpoint group", _gather))
    for phase, work in steps:
        since = {me.rank: (me.store.snapshot() if phase != "default group" else me.spent["rendezvous"])
                 for me in ranks.values()}
        if phase != "default group":
            files[f"before {phase}"] = open_files()
        _each(ranks, work)
        files[phase] = open_files()
        _spent(ranks, phase, since)
        _barrier(sync, phase, processes)  # every rank done with the group before any closes it
        for me in ranks.values():
            me.group = None


def _file_deltas(files: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Files opened per phase: the store client and the default group from the start; each side group from just
    before it was made."""
    def delta(after: str, before: str) -> dict[str, int]:
        return {k: files[after].get(k, 0) - files[before].get(k, 0) for k in ("socket", "other")}

    out = {"default group": delta("default group", "start")}
    for phase in PHASES[2:]:
        out[phase] = delta(phase, f"before {phase}")
    return out


@dataclass
class SizeFigures:
    """One world size: per phase, (store requests, keys read) and (sockets, other files) of rank 0 and of every
    other rank (the most any of them made; files and memory averaged, as threads of a process share its table and
    its memory). Without gloo groups (a size past what this machine's memory holds), the rendezvous alone."""

    world: int
    store: dict[str, dict[str, list[int]]]  # "rank 0" | "other ranks" -> phase -> [requests, keys read]
    files: dict[str, dict[str, dict[str, float]]]  # "rank 0" | "other ranks" -> phase -> {socket, other}
    memory_kib: dict[str, float]  # "rank 0" | "other ranks" -> memory once joined: store client, default group
    server_sockets: int  # rank 0's store server: one per client
    seconds: float


def _aggregate(world: int, results: list[dict], server_sockets: int, seconds: float) -> SizeFigures:
    errors = [f"rank {r}: {e}" for res in results for r, (_, e) in res["ranks"].items() if e]
    if errors:
        raise RuntimeError(f"{len(errors)} rank(s) failed at W={world}: {errors[:3]}")
    spent = {r: s for res in results for r, (s, _) in res["ranks"].items()}
    others = [s for r, s in spent.items() if r]
    phases = [p for p in PHASES if p in spent[0]]
    store = {"rank 0": {p: list(spent[0][p]) for p in phases},
             "other ranks": {p: [max(s[p][0] for s in others), max(s[p][1] for s in others)] for p in phases}}
    memory = {"rank 0": results[0]["memory_kib"],
              "other ranks": sum(res["memory_kib"] for res in results[1:]) / (world - 1)}
    if len(phases) == 1:
        return SizeFigures(world, store, {}, memory, server_sockets, seconds)
    deltas = [_file_deltas(res["files"]) for res in results]
    files = {"rank 0": {p: {k: float(v) for k, v in deltas[0][p].items()} for p in PHASES[1:]},
             "other ranks": {p: {k: sum(d[p][k] for d in deltas[1:]) / (world - 1) for k in ("socket", "other")}
                             for p in PHASES[1:]}}
    return SizeFigures(world, store, files, memory, server_sockets, seconds)


def measure(world: int, per_process: int = 512, gloo: bool = True) -> SizeFigures:
    """Every rank of a `world`-rank job started against one real TCPStore (rank 0 a process of its own); with
    `gloo`, each gloo group made and first used too."""
    start = time.perf_counter()
    ctx = mp.get_context("fork")  # nothing has started a thread here yet; a fresh interpreter costs seconds
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child,), daemon=True)
    server.start()
    port, base = parent.recv(), open_files(server.pid)
    rest = list(range(1, world))
    parts = [[0]] + [rest[i:i + per_process] for i in range(0, len(rest), per_process)]
    pipes = [ctx.Pipe() for _ in parts]
    workers = [ctx.Process(target=_play, args=(world, part, port, len(parts), gloo, c), daemon=True)
               for part, (_, c) in zip(parts, pipes)]
    for w in workers:
        w.start()
    results = [p.recv() for p, _ in pipes]
    sockets = open_files(server.pid)["socket"] - base["socket"] - len(parts)  # less the harness's own clients
    for p, _ in pipes:
        p.send("done")
    for w in workers:
        w.join(60)
    parent.send("done")
    server.join(60)
    return _aggregate(world, results, sockets, time.perf_counter() - start)


def group_creations(world: int) -> dict[str, int]:
    """The group creations rank 1 (a member of a node group and of a tie group) takes part in, on torch's fake
    process group: the health check's node groups and the pipeline's tie groups through process_group.subgroups,
    and the node groups through torch's new_subgroups_by_enumeration. With NCCL bound to a GPU each such creation
    is a split of the world's communicator, every rank taking part."""
    import torch.distributed.distributed_c10d as c10d
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  registers the "fake" backend

    nodes = [list(range(n, n + RANKS_PER_NODE)) for n in range(0, world, RANKS_PER_NODE)]
    last = (PIPELINE_STAGES - 1) * world // PIPELINE_STAGES
    ties = [[c, last + c] for c in range(world // PIPELINE_STAGES)]  # first and last stage of each replica
    made = collections.Counter[str]()
    real = c10d._new_group_with_tag

    def counted(*args: Any, **kwargs: Any) -> Any:
        made["now"] += 1
        return real(*args, **kwargs)

    out = {}
    dist.init_process_group("fake", store=dist.HashStore(), rank=1, world_size=world)
    c10d._new_group_with_tag = counted
    try:
        for name, make in (("health node groups", lambda: process_group.subgroups(nodes, "health")),
                           ("pipeline tie groups", lambda: process_group.subgroups(ties, "tie_embeddings")),
                           ("node groups by torch's enumeration",
                            lambda: dist.new_subgroups_by_enumeration(nodes))):
            made["now"] = 0
            make()
            out[name] = made["now"]
    finally:
        c10d._new_group_with_tag = real
        dist.destroy_process_group()
    return out


@dataclass(frozen=True)
class Growth:
    form: str  # constant, log or linear
    fit: str
    at_project: float


def growth(worlds: list[int], values: list[float]) -> Growth:
    """A figure's growth with W: constant where it never moves, else benchmarks.control_plane's fit (log2 W or W,
    whichever leaves the smaller residual)."""
    if max(values) - min(values) < 1e-9:
        return Growth("constant", f"{values[0]:g}", float(values[0]))
    f = fit_growth(worlds, values)  # a cost that falls with W: its mean, a constant
    a, b = (round(v, 2) + 0.0 for v in (f.a, f.b))  # + 0.0: no "-0" for a fit's zero
    shown = f"{a:g}" if f.form == "constant" else f"{a:g} + {b:g} x {'W' if f.form == 'linear' else 'log2 W'}"
    return Growth(f.form, shown, round(f.at(PROJECT), 1))


def series(sizes: list[SizeFigures], creations: dict[int, dict[str, int]]) -> dict[str, dict[int, float]]:
    """Every figure by name: its value at each size that measured it."""
    out: dict[str, dict[int, float]] = collections.defaultdict(dict)
    for s in sizes:
        for who in ("other ranks", "rank 0"):
            for phase, (requests, keys) in s.store[who].items():
                out[f"{who}: store requests, {phase}"][s.world] = requests
                out[f"{who}: keys read, {phase}"][s.world] = keys
            for phase, kinds in s.files.get(who, {}).items():
                out[f"{who}: sockets, {phase}"][s.world] = kinds["socket"]
                out[f"{who}: other files, {phase}"][s.world] = kinds["other"]
            if s.files:
                out[f"{who}: sockets, all"][s.world] = sum(k["socket"] for k in s.files[who].values())
                out[f"{who}: memory KiB, store client and default group"][s.world] = round(s.memory_kib[who])
        out["rank 0: store server sockets"][s.world] = s.server_sockets
        for name, count in creations[s.world].items():
            out[f"rank 1: group creations, {name}"][s.world] = count
    return out


def print_tables(sizes: list[SizeFigures], figures: dict[str, dict[int, float]], fits: dict[str, Growth]) -> None:
    worlds = [s.world for s in sizes]
    print(f"\nper rank, at W = {', '.join(map(str, worlds))} (seconds per size: "
          f"{', '.join(f'{s.seconds:.1f}' for s in sizes)}; '-': not measured at that size)")
    print(f"{'figure':<62} {'values':<52} {'growth':<22} {'at ' + str(PROJECT):>9}")
    for name, values in figures.items():
        shown = " ".join(f"{values[w]:g}" if w in values else "-" for w in worlds)
        g = fits[name]
        print(f"{name:<62} {shown:<52} {(g.form + ': ' + g.fit):<22} {g.at_project:>9g}")
    linear = [n for n, g in fits.items() if g.form == "linear"]
    print(f"\nlinear in W: {', '.join(linear) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--per-process", type=int, default=512, help="simulated ranks per process (threads)")
    parser.add_argument("--gloo-up-to", type=int, default=GLOO_UP_TO,
                        help="the largest size whose ranks make gloo groups (memory: see GLOO_UP_TO)")
    args = parser.parse_args()
    sizes = []
    for world in args.ranks:
        sizes.append(measure(world, args.per_process, gloo=world <= args.gloo_up_to))
        print(f"W={world}: {sizes[-1].seconds:.1f} s", flush=True)
    creations = {w: group_creations(w) for w in args.ranks}  # last: nothing forks after the fake group
    figures = series(sizes, creations)
    fits = {name: growth(list(values), list(values.values())) for name, values in figures.items()}
    print_tables(sizes, figures, fits)
    path = save_results("startup_scale", {
        "ranks": args.ranks, "per_process": args.per_process, "gloo_up_to": args.gloo_up_to, "project": PROJECT,
        "sizes": [vars(s) for s in sizes],
        "figures": {n: {"values": {str(w): x for w, x in v.items()}, **vars(fits[n])} for n, v in figures.items()}})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
