"""One row of figures per point: throughput, step times, breakdown, stragglers, and where its ranks ran.

Conventions
- Steady state: each rank's first `skip_windows` log windows (start-up, warm-up, compilation) are left out when
  more windows remain. p50/p90 are over every (rank, window) step time that is left.
- tokens/s is the global figure each rank logs (the median over ranks and windows); per rank = total / ranks.
- Efficiency is per-rank throughput against the smallest point. With the per-rank batch fixed (weak scaling)
  that is t_ref / t; with the global batch fixed (strong scaling) it is (t_ref x ranks_ref) / (t x ranks):
  speed-up over ideal speed-up. Both are the same ratio of tokens/s per rank; the report says which applies.
- Stragglers: the rule of gpt.resilience.stragglers replayed on the per-rank records (same thresholds as in training).
"""
from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gpt.config.model import ModelConfig
from gpt.config.parse import section
from gpt.config.sections import StragglerConfig
from gpt.config.strategy import ParallelConfig, StrategyConfig
from gpt.parallel.traits import traits_of
from gpt.resilience.stragglers import StragglerDetector
from launch.report.perf_model import Shape
from launch.report.points import PointResult, get

log = logging.getLogger(__name__)

# Per-step figures the trainer records each window (gpt.resilience.stragglers.FIGURES); any of them may be absent.
BREAKDOWN = ("data_time_s", "fwd_bwd_s", "optimizer_s", "comm_s", "compute_s")


@dataclass
class Row:
    point: str
    nodes: int
    ranks: int
    tasks_per_node: int
    strategy: str
    global_batch: int
    batch_per_rank: float          # sequences per data-parallel rank per step
    tokens_per_step: int
    tokens_per_s: float
    tokens_per_s_rank: float
    mfu: float | None
    step_time_p50_s: float
    step_time_p90_s: float
    step_time_min_s: float
    step_time_max_s: float
    comm_fraction: float | None
    stragglers: int
    straggler_ranks: str           # "rank@host; ..."
    windows: int                   # steady windows used
    data_time_s: float | None = None   # step-time breakdown, medians over ranks and windows (None: not recorded)
    fwd_bwd_s: float | None = None
    optimizer_s: float | None = None
    comm_s: float | None = None    # waiting for the other ranks, on the host and the device
    compute_s: float | None = None  # step time - comm_s: what the stragglers are judged on
    shared_host: bool = False      # several "nodes" on one machine: no network measured
    threads: int | None = None     # threads per rank (None: not recorded)
    cores_per_rank: float | None = None
    efficiency: float = math.nan
    efficiency_per_core: float | None = None  # tokens/s per CPU core against the reference's (None: not recorded)
    predicted_step_time_s: float = math.nan
    predicted_efficiency: float = math.nan
    model_error: float = math.nan  # model step / measured step - 1, the model fitted to every point
    loo_error: float | None = None  # the same, the model fitted without this point (3 points or more)
    model_flag: str = ""           # why the model misses this point by more than 10%


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def steady(records: list[dict[str, Any]], skip: int) -> list[dict[str, Any]]:
    return records[skip:] if len(records) > skip else records


def finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def replay_stragglers(point: PointResult, config: StragglerConfig, skip: int) -> tuple[list[int], list[Any]]:
    """The training-time rule over the windows every rank logged: (chronic stragglers at the end, events)."""
    ranks = sorted(point.records)
    if len(ranks) < 2 or ranks != list(range(point.ranks)):
        return [], []
    by_rank = [{r["step"]: r for r in steady(point.records[k], skip)} for k in ranks]
    steps = sorted(set.intersection(*(set(d) for d in by_rank)))
    detector = StragglerDetector(len(ranks), config)
    hosts = point.hosts
    events, flagged = [], set()
    for step in steps:
        summary = detector.observe(step, [d[step] for d in by_rank], hosts)
        events.extend(summary.events)
        flagged.update(summary.stragglers)
    return sorted(flagged), events


def shape_of(point: PointResult, params: int | None = None) -> Shape:
    cfg = point.config
    return Shape(
        nodes=point.nodes,
        tasks_per_node=max(point.ranks // point.nodes, 1),
        global_batch=int(get(cfg, "train.global_batch_size", 1)),
        block_size=int(get(cfg, "model.block_size", 1)),
        n_embd=int(get(cfg, "model.n_embd", 1)),
        n_layer=int(get(cfg, "model.n_layer", 1)),
        params=parameter_count(point) if params is None else params,
        strategy=section(StrategyConfig, "strategy", get(cfg, "strategy", {"name": "single"})),
        precision=str(get(cfg, "train.precision", "fp32")),
        reduce_dtype=str(get(cfg, "train.reduce_dtype", "fp32")),
        float8_gathered=float8_gathered(point) if get(cfg, "train.fp8_all_gather", False) else 0,
        parallel=section(ParallelConfig, "parallel", get(cfg, "parallel")),
        cores_per_rank=point.cores_per_rank,
        shared_host=bool(point.shared_host),
    )


def model_config(point: PointResult) -> ModelConfig:
    """The run's model section, its vocabulary from the data's meta where the config left it to the data."""
    model = dict(get(point.config, "model", {}))
    if model.get("vocab_size") is None:
        from gpt.data import read_meta

        model["vocab_size"] = get(point.config, "data.vocab_size") or read_meta(get(point.config, "data.dir"))[
            "vocab_size"]
    return section(ModelConfig, "model", model)


def float8_gathered(point: PointResult) -> int:
    """Values a train.fp8_all_gather run gathers in float8 (a byte each): its all-gathers' bytes."""
    from gpt.parallel.memory_estimate import float8_weights

    try:
        return float8_weights(model_config(point), str(get(point.config, "train.fp8_recipe", "tensorwise")))
    except Exception as e:  # noqa: BLE001 - a report must survive a moved data folder
        log.info("%s: the float8 layers could not be named (%s); their all-gathers counted at bf16", point.name, e)
        return 0


def parameter_count(point: PointResult) -> int:
    """Model parameters: logged, else counted from the model config, else estimated from the bytes rank 0 holds."""
    first = next((recs[0] for recs in point.records.values() if recs), {})
    if first.get("model_params"):
        return int(first["model_params"])
    try:
        from gpt.model.flops import param_count

        return int(param_count(model_config(point))["total"])
    except Exception as e:  # noqa: BLE001 - a report must survive a moved data folder
        log.info("%s: counting parameters from the config failed (%s); estimating from param_bytes", point.name, e)
    held = first.get("param_bytes") or 0
    shape = shape_of(point, params=0)  # the layout, to undo the share of the parameters a rank holds
    return int(held / 4 / traits_of(shape.strategy.name).param_fraction(shape.strategy, shape.dims))


def median_or_none(values: Iterable[Any]) -> float | None:
    xs = finite(values)
    return statistics.median(xs) if xs else None


def summarize(point: PointResult, skip: int, stragglers: StragglerConfig) -> Row:
    pairs = [r for rank in sorted(point.records) for r in steady(point.records[rank], skip)]
    if not pairs:
        raise ValueError(f"{point.path}: no train records in metrics/rank*.jsonl")
    step_times = finite(r.get("step_time_s") for r in pairs)
    comm = median_or_none(r["comm_s"] / r["step_time_s"] for r in pairs
                          if isinstance(r.get("comm_s"), (int, float)) and r.get("step_time_s"))
    flagged, _ = replay_stragglers(point, stragglers, skip)
    hosts = point.hosts
    shape = shape_of(point)
    total = median_or_none(r.get("tokens_per_s") for r in pairs)
    total = math.nan if total is None else total
    return Row(
        point=point.name, nodes=point.nodes, ranks=point.ranks, tasks_per_node=shape.tasks_per_node,
        strategy=shape.strategy.name, global_batch=shape.global_batch, batch_per_rank=shape.global_batch / shape.dp,
        tokens_per_step=shape.global_batch * shape.block_size, tokens_per_s=total,
        tokens_per_s_rank=total / point.ranks, mfu=median_or_none(r.get("mfu") for r in pairs),
        step_time_p50_s=percentile(step_times, 50), step_time_p90_s=percentile(step_times, 90),
        step_time_min_s=min(step_times), step_time_max_s=max(step_times), comm_fraction=comm,
        stragglers=len(flagged), straggler_ranks="; ".join(f"{r}@{hosts[r]}" for r in flagged),
        windows=len(pairs) // max(len(point.records), 1),
        **{key: median_or_none(r.get(key) for r in pairs) for key in BREAKDOWN},
        shared_host=bool(point.shared_host), threads=point.threads, cores_per_rank=point.cores_per_rank,
    )


def scaling_mode(rows: Sequence[Row]) -> str:
    """'weak' (per-rank batch fixed), 'strong' (global batch fixed), 'single point', or 'mixed'."""
    if len({r.ranks for r in rows}) < 2:
        return "single point"
    if len({r.batch_per_rank for r in rows}) == 1:
        return "weak"
    if len({r.global_batch for r in rows}) == 1:
        return "strong"
    return "mixed"


def add_efficiency(rows: list[Row]) -> Row:
    """Efficiency of every row against the smallest point (fewest ranks, then nodes); returns that point."""
    ref = min(rows, key=lambda r: (r.ranks, r.nodes))
    for r in rows:
        r.efficiency = r.tokens_per_s_rank / ref.tokens_per_s_rank if ref.tokens_per_s_rank else math.nan
        if r.cores_per_rank and ref.cores_per_rank and ref.tokens_per_s:
            # ranks sharing one machine's cores: what matters is the throughput those cores give
            r.efficiency_per_core = ((r.tokens_per_s / (r.ranks * r.cores_per_rank))
                                     / (ref.tokens_per_s / (ref.ranks * ref.cores_per_rank)))
    return ref
