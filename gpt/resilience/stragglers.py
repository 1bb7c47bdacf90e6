"""Per-rank step-time figures brought together once per log window, and straggler detection.

Every rank hands `StragglerMonitor.update` its figures for the window just closed (means per step: step time and
its breakdown, tokens/s). One small `all_gather` of a float vector (through gpt.collectives.process_group, on the host
path) brings every rank's figures to every rank; the hosts are gathered once, at the first window. Rank 0 logs
`summary.metrics()` and warns on `summary.events`.

The detection itself (`StragglerDetector`) is pure: it sees a list of per-rank figure dicts per window, so it is
tested without processes and replayed offline by the scaling report (launch.report) on the metrics files.

What is compared. In synchronous training every rank's wall-clock step time is the same: a fast rank waits for the
slow one inside a collective (on a GPU, on the device: its host never waits). So a rank is judged on its *busy* time,
its device compute (`compute_s`, from gpt.train.step_timer: the step time minus the communication wait measured
where it happens, on the host or the device; under layouts whose peers wait inside forward/backward, minus the wait
the compute probe finds there, gpt.train.compute_probe); in records without it, the step time minus `comm_s` when
that was measured, else the step time.

The rule. Each window, a rank's lag is `busy / median(busy over the other ranks) - 1`: the other ranks, so that a
straggler does not pull its own baseline up (with 2 ranks the median of both is halfway to the straggler's time,
which would halve its lag). A rank that lags by more than
`threshold_pct` (and by at least `min_excess_s`) is *lagging* this window; one that lags in `windows` consecutive
windows is a *straggler* (chronic), which tells it from a one-off hiccup (GC pause, a slow batch). An exponential
moving average of the lag (`ema_alpha`) ranks the slowest ranks for the top-k list and is logged; it is not the
rule itself, because an average lingers for windows after a single spike and would make one-offs look chronic.
"""
from __future__ import annotations

import bisect
import logging
import math
import statistics
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from typing import Any

from gpt.config.sections import StragglerConfig

log = logging.getLogger(__name__)

# The figures gathered each window, in this order; a figure a rank did not measure travels as NaN.
# All are means per optimizer step over the window, in seconds, except tokens_per_s_rank.
FIGURES = (
    "step_time_s",       # wall clock per step
    "data_time_s",       # waiting for the next batch
    "fwd_bwd_s",         # forward + backward (on GPU: CUDA events; includes the wait for the gradient reduction)
    "optimizer_s",       # clipping + optimizer step + zero_grad
    "comm_s",            # waiting for the other ranks: flags all-reduce, gradient sync, the probe's wait in fwd/bwd
    "compute_s",         # device compute: step_time_s - comm_s, what a rank spends on its own work
    "tokens_per_s_rank",  # tokens this rank's replica trained on per second / ranks
    "probe_s",           # this rank's time for the compute probe (gpt.train.compute_probe), once per window
)


def _num(value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return math.nan
    return f


def busy_time(figures: Mapping[str, Any]) -> float:
    """A rank's own time per step: its device compute, else step time minus time spent in collectives (when
    measured)."""
    compute = _num(figures.get("compute_s"))
    if math.isfinite(compute):
        return compute
    step = _num(figures.get("step_time_s"))
    comm = _num(figures.get("comm_s"))
    if math.isfinite(comm) and math.isfinite(step):
        return max(step - comm, 0.0)
    return step


@dataclass(frozen=True)
class RankLag:
    rank: int
    host: str
    step_time_s: float
    busy_s: float
    lag_pct: float       # this window, against the median busy time of the other ranks
    ema_lag_pct: float   # moving average of the lag


@dataclass(frozen=True)
class StragglerEvent:
    step: int
    rank: int
    host: str
    kind: str  # "straggler" (became chronic) or "recovered"
    lag_pct: float
    busy_s: float
    median_s: float      # the median busy time of the other ranks
    windows: int  # consecutive lagging windows so far

    def message(self) -> str:
        if self.kind == "straggler":
            return (f"straggler: rank {self.rank} on {self.host} is {self.lag_pct:.0f}% slower than the median of "
                    f"the other ranks ({self.busy_s * 1e3:.1f} ms vs {self.median_s * 1e3:.1f} ms per step) for "
                    f"{self.windows} consecutive windows, at step {self.step}")
        return f"rank {self.rank} on {self.host} no longer lags the other ranks (step {self.step})"


@dataclass
class WindowSummary:
    step: int
    world_size: int
    step_time_min_s: float
    step_time_median_s: float
    step_time_max_s: float
    busy_median_s: float
    ranks: list[RankLag]             # every rank, in rank order
    top: list[RankLag]               # the top_k slowest by moving-average lag, slowest first
    lagging: list[int]               # above the threshold this window
    stragglers: list[int]            # chronic: lagging for `windows` consecutive windows
    events: list[StragglerEvent] = field(default_factory=list)
    per_rank_tags: bool = True

    def metrics(self) -> dict[str, float]:
        """Scalars for rank 0's metrics record (and so TensorBoard)."""
        out = {
            "stragglers/step_time_min_s": self.step_time_min_s,
            "stragglers/step_time_median_s": self.step_time_median_s,
            "stragglers/step_time_max_s": self.step_time_max_s,
            "stragglers/busy_median_s": self.busy_median_s,
            "stragglers/count": float(len(self.stragglers)),
            "stragglers/lagging": float(len(self.lagging)),
            "stragglers/max_lag_pct": max((r.lag_pct for r in self.ranks), default=0.0),
        }
        shown = self.ranks if self.per_rank_tags else self.top
        for r in shown:
            out[f"rank_step_time_s/rank{r.rank}"] = r.step_time_s
            out[f"rank_busy_s/rank{r.rank}"] = r.busy_s
        for i, r in enumerate(self.top):
            out[f"stragglers/top{i + 1}_rank"] = float(r.rank)
            out[f"stragglers/top{i + 1}_lag_pct"] = r.ema_lag_pct
        return out


def median_without(xs: Sequence[float], i: int) -> float:
    """The median of sorted `xs` without its element i (NaN when none is left): O(1), so that judging every rank
    against the others costs one sort per window, not one per rank."""
    n = len(xs) - 1
    if n < 1:
        return math.nan
    mid = n // 2
    at = [xs[j + (j >= i)] for j in (mid - 1, mid)] if n % 2 == 0 else [xs[mid + (mid >= i)]]
    return sum(at) / len(at)


class StragglerDetector:
    """The pure rule: feed one window of per-rank figures at a time."""

    def __init__(self, world_size: int, config: StragglerConfig | None = None):
        self.world_size = world_size
        self.config = config or StragglerConfig()
        self.ema: list[float | None] = [None] * world_size
        self.consecutive = [0] * world_size
        self.flagged = [False] * world_size

    def observe(self, step: int, figures: Sequence[Mapping[str, Any]], hosts: Sequence[str] | None = None
                ) -> WindowSummary:
        if len(figures) != self.world_size:
            raise ValueError(f"expected figures of {self.world_size} ranks, got {len(figures)}")
        cfg = self.config
        hosts = list(hosts) if hosts is not None else [str(f.get("host", "?")) for f in figures]
        steps = [_num(f.get("step_time_s")) for f in figures]
        busy = [busy_time(f) for f in figures]
        finite_steps = [s for s in steps if math.isfinite(s)]
        finite_busy = [b for b in busy if math.isfinite(b)]
        median_busy = statistics.median(finite_busy) if finite_busy else math.nan
        ordered = sorted(finite_busy)
        ranks: list[RankLag] = []
        lagging: list[int] = []
        events: list[StragglerEvent] = []
        for r in range(self.world_size):
            others = median_without(ordered, bisect.bisect_left(ordered, busy[r])) if math.isfinite(busy[r]) \
                else math.nan
            if others > 0:
                lag = busy[r] / others - 1.0
                excess = busy[r] - others
            else:
                lag, excess = 0.0, 0.0
            prev = self.ema[r]
            self.ema[r] = lag if prev is None else cfg.ema_alpha * lag + (1 - cfg.ema_alpha) * prev
            if lag * 100 > cfg.threshold_pct and excess >= cfg.min_excess_s:
                lagging.append(r)
                self.consecutive[r] += 1
            else:
                self.consecutive[r] = 0
            chronic = self.consecutive[r] >= cfg.windows
            if chronic and not self.flagged[r]:
                events.append(StragglerEvent(step, r, hosts[r], "straggler", lag * 100, busy[r], others,
                                             self.consecutive[r]))
            elif not chronic and self.flagged[r]:
                events.append(StragglerEvent(step, r, hosts[r], "recovered", lag * 100, busy[r], others, 0))
            self.flagged[r] = chronic
            ranks.append(RankLag(r, hosts[r], steps[r], busy[r], lag * 100, self.ema[r] * 100))
        top = sorted(ranks, key=lambda x: (-x.ema_lag_pct, x.rank))[:cfg.top_k]
        return WindowSummary(
            step=step, world_size=self.world_size,
            step_time_min_s=min(finite_steps, default=math.nan),
            step_time_median_s=statistics.median(finite_steps) if finite_steps else math.nan,
            step_time_max_s=max(finite_steps, default=math.nan),
            busy_median_s=median_busy, ranks=ranks, top=top, lagging=lagging,
            stragglers=[r for r in range(self.world_size) if self.flagged[r]], events=events,
            per_rank_tags=self.world_size <= cfg.per_rank_tags_max)


def figures_vector(figures: Mapping[str, Any]) -> list[float]:
    return [_num(figures.get(name)) for name in FIGURES]


def figures_dict(vector: Sequence[float]) -> dict[str, float | None]:
    return {name: (float(v) if math.isfinite(float(v)) else None) for name, v in zip(FIGURES, vector)}


class StragglerMonitor:
    """What the trainer calls on every rank at each log window (a collective: every rank must call update)."""

    def __init__(self, world_size: int, config: StragglerConfig | None = None, *, host: str | None = None,
                 group: Any = None):
        self.config = config or StragglerConfig()
        self.world_size = world_size
        self.host = host
        self.group = group
        self.hosts: list[str] | None = None
        self.detector = StragglerDetector(world_size, self.config)

    def gather(self, local: Mapping[str, Any]) -> list[dict[str, float | None]]:
        """Every rank's figures, in rank order: one all_gather of len(FIGURES) floats per rank."""
        from gpt.collectives.process_group import gather_vectors

        return [figures_dict(v) for v in gather_vectors(figures_vector(local), group=self.group)]

    def update(self, step: int, local: Mapping[str, Any]) -> WindowSummary:
        return self.observe(step, self.gather(local))

    def observe(self, step: int, figures: Sequence[Mapping[str, Any]]) -> WindowSummary:
        """Judge every rank's gathered figures (a collective on the first window: the hosts are gathered)."""
        if self.hosts is None:
            import socket

            from gpt.collectives.process_group import gather_objects

            self.hosts = [str(h) for h in gather_objects(self.host or socket.gethostname(), group=self.group)]
        return self.detector.observe(step, figures, self.hosts)

    @staticmethod
    def log_events(summary: WindowSummary, logger: logging.Logger = log) -> None:
        for event in summary.events:
            (logger.warning if event.kind == "straggler" else logger.info)("%s", event.message())
