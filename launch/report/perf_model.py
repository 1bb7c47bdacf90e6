"""A small performance model of one training step, fitted to a sweep's measured points.

    step_time(n) = c * W(n) + k * C(n)

W(n)  sequences each rank computes per step: global_batch / ranks (with pipeline stages, a rank computes its
      share of each of global_batch / dp sequences, which is the same number). Compute per sequence is assumed
      constant: no pipeline bubble, no change in kernel efficiency with the per-rank batch.
C(n)  the nominal communication time of the collectives the strategy lists for a step (gpt.parallel.traits:
      kind, bytes, calls, mesh axis), each on its own axis's group of N ranks: latency + bytes / bandwidth, with
      the bus-bandwidth convention of nccl-tests:
        all-reduce                   2 (N-1)/N x bytes  (DDP, HSDP across replicas, tensor-parallel activations)
        all-gather / reduce-scatter  (N-1)/N x bytes    (FSDP/ZeRO-3 parameters and gradients, sequence parallel)
        p2p                          bytes              (pipeline activations and their gradients)
      and a tree-like latency term, 2 log2(N) hops per collective call (NCCL switches from rings to trees at
      scale; a ring's 2 (N-1) hops would predict absurd latencies at thousands of ranks). A kind it does not
      know is an error, not a guess.
      Bandwidth: `intra_node_GBps` (NVLink, 900 GB/s on H100) when the axis's groups stay inside a node (tp, with
      tasks per node a multiple of it), `inter_node_GBps` (InfiniBand NDR, 50 GB/s per port, one port per GPU)
      otherwise.
c, k  c is fitted to every point's busy time (its p50 step time minus the communication time it measured, or minus k
      C(n) where none was measured; measured = `comm_s`, the wait for the other ranks where it happens: the host's flags
      all-reduce, the device's wait for the gradient reduction, and the wait inside forward/backward that the compute
      probe finds under FSDP, tensor parallel, pipeline and ZeRO-3), by least squares on the log of busy time per
      sequence, so that every point counts alike. k is fitted only from points whose ranks sit on separate machines or
      within one real node: from their measured communication time when recorded, else by least squares with c. It says
      how the measured communication compares with the nominal one: 1 = as configured, < 1 = partly hidden behind
      compute (DDP overlaps its all-reduce with the backward), > 1 = slower than the configured network. Points whose
      "nodes" share one machine (cluster=local, or a test cluster of namespaces) measure loopback sockets and contention
      for the same cores, not a network: they are left out of the fit of k, and of c too where other points exist (else
      c comes from them alone). With no point that measures a network, k is fixed at 1 (the configured network).
cores On CPUs, a rank computes with its share of the machine's cores (`cores_per_rank`: its threads, or fewer
      when ranks share cores), so W(n) is scaled by reference cores / the rank's cores: 2 ranks x 1 core on a
      2-core machine compute as fast as 1 rank x 2 cores, not twice as fast. On GPUs, or where the run did not
      record its cores, no scaling.

The model is deliberately simple: it extrapolates what was measured, and is no substitute for measuring at scale.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from gpt.config.report import Network
from gpt.config.strategy import ParallelConfig, StrategyConfig
from gpt.parallel.layout import ParallelDims
from gpt.parallel.traits import Collective, Workload, traits_of

GB = 1e9


@dataclass(frozen=True)
class Shape:
    """What the model needs to know about a sweep point."""

    nodes: int
    tasks_per_node: int
    global_batch: int
    block_size: int
    n_embd: int
    n_layer: int
    params: int                 # model parameters (tied counted once)
    strategy: StrategyConfig = StrategyConfig("ddp")
    precision: str = "fp32"
    reduce_dtype: str = "fp32"  # train.reduce_dtype
    float8_gathered: int = 0    # values gathered in float8 (train.fp8_all_gather; gpt.parallel.memory_estimate)
    parallel: ParallelConfig = ParallelConfig()
    cores_per_rank: float | None = None  # CPU cores a rank computes with; None on GPUs or when not recorded
    shared_host: bool = False            # several "nodes" on one machine: no network between them

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def dims(self) -> ParallelDims:
        """The layout the strategy preset runs on these ranks (as the run itself resolved it)."""
        return traits_of(self.strategy.name).layout(self.strategy, self.parallel, self.ranks)

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def sequences_per_rank(self) -> float:
        return self.global_batch / self.ranks

    @property
    def feasible(self) -> bool:
        return self.global_batch >= self.dp and self.global_batch % self.dp == 0


# Bytes each rank moves through its bottleneck link per byte of the collective (nccl-tests' bus bandwidth).
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n, "p2p": lambda n: 1.0}


@dataclass(frozen=True)
class Comm:
    bus_bytes: float       # bytes each rank moves through its bottleneck link per step (bus-bandwidth convention)
    calls: int             # collective calls per step (each pays the latency term)
    p2p_bytes: float = 0.0
    p2p_calls: int = 0
    description: str = ""


def collectives(s: Shape) -> list[Collective]:
    """The strategy's own list of collectives per step on this shape (gpt.parallel.traits)."""
    if s.ranks == 1:
        return []
    work = Workload(s.params, s.n_layer, s.n_embd, s.block_size, s.global_batch, s.precision,
                    s.reduce_dtype, s.float8_gathered)
    return traits_of(s.strategy.name).collectives(s.strategy, s.dims, work)


def axis_size(dims: ParallelDims, axis: str) -> int:
    return dims.dp if axis == "dp" else dims.sizes()[axis]


def crosses_nodes(s: Shape, axis: str) -> bool:
    """Whether a group of `axis` spans machines: ranks sit row-major on the mesh (pp, dp_replicate, dp_shard,
    tp), so a group covers size x (sizes of the axes inside it) consecutive ranks."""
    dims = s.dims
    inner = {"pp": dims.dp * dims.tp, "dp": dims.tp, "dp_replicate": dims.dp_shard * dims.tp,
             "dp_shard": dims.tp, "tp": 1}[axis]
    return s.nodes > 1 and s.tasks_per_node % (axis_size(dims, axis) * inner) != 0


def _bus_factor(c: Collective, n: int) -> float:
    if c.kind not in BUS_FACTOR:
        raise ValueError(f"unknown collective {c.kind!r} on axis {c.axis} ({c.what}): the performance model knows "
                         f"{', '.join(BUS_FACTOR)}")
    return BUS_FACTOR[c.kind](n)


def comm_volume(s: Shape) -> Comm:
    """Bus bytes and calls per step, summed over the strategy's collectives (p2p apart)."""
    bus = calls = p2p = p2p_calls = 0.0
    for c in collectives(s):
        n = axis_size(s.dims, c.axis)
        if c.kind == "p2p":
            p2p, p2p_calls = p2p + c.bytes, p2p_calls + c.calls
        elif n > 1:
            bus, calls = bus + _bus_factor(c, n) * c.bytes, calls + c.calls
    what = "; ".join(f"{c.kind} over {c.axis}: {c.what}" for c in collectives(s)) or "no communication"
    return Comm(bus, int(calls), p2p, int(p2p_calls), what)


def collective_time(s: Shape, c: Collective, net: Network) -> float:
    """Seconds of one step's `c` on the configured network: bytes over the link its group uses, plus latency
    (a tree-like 2 log2(N) hops per collective call, one hop per p2p message)."""
    n = axis_size(s.dims, c.axis)
    factor = _bus_factor(c, n)
    if n == 1:
        return 0.0
    inter = crosses_nodes(s, c.axis)
    bw = (net.inter_node_GBps if inter else net.intra_node_GBps) * GB
    lat = (net.inter_node_latency_us if inter else net.intra_node_latency_us) * 1e-6
    hops = 1 if c.kind == "p2p" else 2 * math.ceil(math.log2(n))
    return factor * c.bytes / bw + c.calls * hops * lat


def nominal_comm_time(s: Shape, net: Network) -> float:
    """Seconds per step the collectives take on the configured network (no overlap with compute)."""
    return sum(collective_time(s, c, net) for c in collectives(s))


@dataclass(frozen=True)
class FittedModel:
    compute_s_per_sequence: float  # c
    comm_scale: float              # k
    network: Network
    method: str                    # how c and k were obtained
    residual_rms_s: float = 0.0
    reference_cores: float | None = None  # c is per sequence for a rank with this many cores (None: per rank)

    def work(self, s: Shape) -> float:
        """Sequences per rank, scaled to the reference's cores on CPUs."""
        if self.reference_cores and s.cores_per_rank:
            return s.sequences_per_rank * self.reference_cores / s.cores_per_rank
        return s.sequences_per_rank

    def compute_time(self, s: Shape) -> float:
        return self.compute_s_per_sequence * self.work(s)

    def comm_time(self, s: Shape) -> float:
        return self.comm_scale * nominal_comm_time(s, self.network)

    def step_time(self, s: Shape) -> float:
        return self.compute_time(s) + self.comm_time(s)

    def tokens_per_s(self, s: Shape) -> float:
        return s.global_batch * s.block_size / self.step_time(s)

    def efficiency(self, s: Shape, reference: Shape) -> float:
        """Per-rank throughput relative to the reference point (weak and strong scaling alike)."""
        return (self.tokens_per_s(s) / s.ranks) / (self.tokens_per_s(reference) / reference.ranks)

    def as_dict(self) -> dict[str, Any]:
        return {"compute_s_per_sequence": self.compute_s_per_sequence, "comm_scale": self.comm_scale,
                "reference_cores": self.reference_cores, "method": self.method,
                "residual_rms_s": self.residual_rms_s, "network": asdict(self.network)}


def _lstsq2(a: Sequence[float], b: Sequence[float], y: Sequence[float]) -> tuple[float, float] | None:
    """Least squares y ~ c a + k b; None when a and b cannot be told apart."""
    saa = sum(x * x for x in a)
    sbb = sum(x * x for x in b)
    sab = sum(x * z for x, z in zip(a, b))
    det = saa * sbb - sab * sab
    if len(y) < 2 or saa == 0 or sbb == 0 or det <= 1e-12 * saa * sbb:
        return None
    say = sum(x * z for x, z in zip(a, y))
    sby = sum(x * z for x, z in zip(b, y))
    return (sbb * say - sab * sby) / det, (saa * sby - sab * say) / det


def _comm_scale(shapes: Sequence[Shape], a: list[float], b: list[float], y: list[float],
                comm: list[float | None]) -> tuple[float, str]:
    """k, and how it was obtained, from the points that measure a network (never from shared-host points)."""
    net = [i for i, s in enumerate(shapes) if b[i] > 0 and not s.shared_host]
    if not net:
        why = "every multi-rank point shares one machine" if any(b) else "no point communicates"
        return 1.0, f"k fixed at 1 ({why}: no network measured)"
    timed = [i for i in net if comm[i] is not None]
    if timed:
        k = sum(b[i] * comm[i] for i in timed) / sum(b[i] ** 2 for i in timed)
        return k, f"k from the measured communication time of {len(timed)} point(s)"
    own = [i for i, s in enumerate(shapes) if not s.shared_host]
    both = _lstsq2([a[i] for i in own], [b[i] for i in own], [y[i] for i in own])
    if both is None:
        return 1.0, "k fixed at 1 (the points cannot separate it from compute)"
    if both[1] < 0:
        return 0.0, "k clipped at 0 (no measurable communication)"
    return both[1], "k by least squares with c"


def _compute_scale(a: list[float], b: list[float], y: list[float], comm: list[float | None],
                   k: float) -> float:
    """c by least squares on the log of each point's busy time per unit of work (busy = step time minus
    communication): every point counts alike, and the fit misses two points by the same ratio either way."""
    busy = [yi - (ci if ci is not None else k * bi) for yi, bi, ci in zip(y, b, comm)]
    logs = [math.log(ti / ai) for ai, ti in zip(a, busy) if ai > 0 and ti > 0]
    return math.exp(sum(logs) / len(logs)) if logs else 0.0


def fit(shapes: Sequence[Shape], step_times: Sequence[float], network: Network | None = None,
        comm_times: Sequence[float | None] | None = None) -> FittedModel:
    """Fit c and k to measured step times (seconds, e.g. each point's p50) and communication times."""
    if not shapes or len(shapes) != len(step_times):
        raise ValueError("fit needs one measured step time per shape, and at least one shape")
    net = network or Network()
    return _fit(shapes, [nominal_comm_time(s, net) for s in shapes], step_times, net, comm_times)


def _fit(shapes: Sequence[Shape], b: list[float], step_times: Sequence[float], net: Network,
         comm_times: Sequence[float | None] | None) -> FittedModel:
    """fit() given each shape's nominal communication time b (leave-one-out reuses them: they are the costly part)."""
    cores = [s.cores_per_rank for s in shapes]
    probe = FittedModel(1.0, 0.0, net, "", reference_cores=cores[0] if all(cores) else None)
    a = [probe.work(s) for s in shapes]
    y = list(step_times)
    comm = list(comm_times) if comm_times else [None] * len(shapes)
    k, k_how = _comm_scale(shapes, a, b, y, comm)
    # Shared-host points compute on cores their ranks share: c comes from the other points where there are any.
    own = [i for i, s in enumerate(shapes) if not s.shared_host] or list(range(len(shapes)))
    c = _compute_scale(*([v[i] for i in own] for v in (a, b, y, comm)), k)
    if len(own) == len(shapes):
        shared = sum(s.shared_host for s in shapes)
        c_how = "c from every point's busy time" + (" (all share one machine)" if shared else "")
    else:
        c_how = f"c from the busy time of the {len(own)} point(s) on machines of their own (shared-host points out)"
    model = replace(probe, compute_s_per_sequence=c, comm_scale=k, method=f"{c_how}; {k_how}")
    rms = math.sqrt(sum((c * ai + k * bi - t) ** 2 for ai, bi, t in zip(a, b, y)) / len(y))
    return replace(model, residual_rms_s=rms)


@dataclass(frozen=True)
class PointError:
    """The model against one measured point: fitted to every point, and fitted without it (leave-one-out)."""

    measured_s: float
    model_s: float
    loo_s: float | None  # None with fewer than 3 points

    @property
    def error(self) -> float:
        return self.model_s / self.measured_s - 1

    @property
    def loo_error(self) -> float | None:
        return None if self.loo_s is None else self.loo_s / self.measured_s - 1


def point_errors(shapes: Sequence[Shape], step_times: Sequence[float], network: Network | None = None,
                 comm_times: Sequence[float | None] | None = None) -> list[PointError]:
    """The fit's error on each of its own points, and leave-one-out where there are at least 3 points."""
    if not shapes or len(shapes) != len(step_times):
        raise ValueError("fit needs one measured step time per shape, and at least one shape")
    net = network or Network()
    comm = list(comm_times) if comm_times else [None] * len(shapes)
    b = [nominal_comm_time(s, net) for s in shapes]
    model = _fit(shapes, b, step_times, net, comm)
    out = []
    for i, (s, t) in enumerate(zip(shapes, step_times)):
        loo = None
        if len(shapes) >= 3:
            rest = [j for j in range(len(shapes)) if j != i]
            held_out = _fit([shapes[j] for j in rest], [b[j] for j in rest], [step_times[j] for j in rest], net,
                            [comm[j] for j in rest])
            loo = held_out.compute_time(s) + held_out.comm_scale * b[i]
        out.append(PointError(t, model.compute_time(s) + model.comm_scale * b[i], loo))
    return out


def scaled_shape(reference: Shape, nodes: int, mode: str) -> Shape:
    """The reference point at another node count, on machines of its own (no shared host): per-rank batch kept
    (weak) or global batch kept (strong)."""
    grown = replace(reference, nodes=nodes, shared_host=False)
    if mode == "strong":
        return grown
    per_dp = reference.global_batch / reference.dp
    return replace(grown, global_batch=round(per_dp * grown.dp))
