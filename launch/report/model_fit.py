"""The performance model of a scaling report: its fit to the points, its error on each, and its predictions.

A point the model (fitted to every point) misses by more than `TOLERANCE` is flagged with the likely cause, read
from the point's own files: oversubscribed cores, a shared host (whose collectives run over loopback between ranks
that share cores, which the model's network term does not describe), a noisy measurement, collectives slower or
faster than the model's network term, or compute that does not scale with the per-rank batch. The cause agrees with
the sign of the miss: oversubscribed cores and a noisy measurement explain only a point slower than the model.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from gpt.config.report import Network
from gpt.errors import ConfigError
from launch.report.perf_model import FittedModel, Shape, fit, point_errors, scaled_shape
from launch.report.points import PointResult
from launch.report.rows import Row, median_or_none, steady

TOLERANCE = 0.10
FIGURES = ("step_time_s", "compute_s", "comm_s", "tokens_per_s", "efficiency")
NOISY_P90_OVER_P50 = 1.3


def measured_comm(point: PointResult, skip: int) -> float | None:
    return median_or_none(r.get("comm_s") for rank in sorted(point.records) for r in steady(point.records[rank], skip))


def noisy(row: Row) -> bool:
    return row.step_time_p90_s > NOISY_P90_OVER_P50 * row.step_time_p50_s


def fit_points(points: Sequence[PointResult], rows: Sequence[Row], shapes: Sequence[Shape], network: Network,
               skip: int) -> FittedModel:
    """Fit the model, and fill each row's model step time, its error, and the flag where it misses."""
    step_times = [r.step_time_p50_s for r in rows]
    comm = [measured_comm(p, skip) for p in points]
    model = fit(shapes, step_times, network, comm)
    for point, row, shape, err in zip(points, rows, shapes, point_errors(shapes, step_times, network, comm)):
        row.predicted_step_time_s = figures(model, shape, shape)["step_time_s"]  # what predict() says of it too
        row.model_error, row.loo_error = row.predicted_step_time_s / row.step_time_p50_s - 1, err.loo_error
        if abs(err.error) > TOLERANCE:  # leave-one-out errors are stated, not flagged: they test the data too
            others = [r.point for r in rows if r is not row and noisy(r)]
            row.model_flag = likely_cause(point, row, model, shape, others)
    return model


def likely_cause(point: PointResult, row: Row, model: FittedModel, shape: Shape, noisy_others: Sequence[str]) -> str:
    """Why the model misses this point, from what the point (and the others) recorded. A cause agrees with the sign
    of the miss: waiting for cores, other load and loopback collectives only make a point slower than the model."""
    short = row.step_time_p50_s - row.predicted_step_time_s
    slower = short > 0
    if slower and point.oversubscribed:
        return f"oversubscribed: {point.oversubscribed}, so ranks wait for cores"
    if slower and noisy(row):
        return (f"noisy: step time p90 is {row.step_time_p90_s / row.step_time_p50_s:.2f}x p50 "
                "(other load on the machine?)")
    busy = (row.step_time_p50_s - (row.comm_s or 0.0)) / model.compute_time(shape)
    if not slower and noisy_others and busy < 1:  # a clean point runs faster than noisy points made the model expect
        return (f"the fit rests on noisy point(s) {', '.join(noisy_others)} (p90 > {NOISY_P90_OVER_P50:g}x p50): "
                f"this point's busy time per sequence is {busy:.2f}x the model's")
    if point.shared_host and row.comm_s and slower and row.comm_s >= short / 2:
        return (f"shared host: {row.comm_s:.3g} s of each step is spent in collectives over loopback between ranks "
                f"that share cores (the model's network term: {model.comm_time(shape):.2g} s)")
    # the share of the miss that compute makes (the rest is the collectives'): under half, compute is not the cause
    if (busy - 1) * model.compute_time(shape) / short < 0.5:
        measured = f" (measured: {row.comm_s:.3g} s)" if row.comm_s is not None else ""
        return (f"communication: {'more' if slower else 'less'} time in collectives than the model's "
                f"{model.comm_time(shape):.2g} s{measured}")
    cause = f"compute: its busy time per sequence is {busy:.2f}x the model's"
    if point.shared_host:
        return (f"shared host: {cause}; ranks that share one machine's cores (and its other load) do not compute "
                "like separate nodes")
    return f"{cause} (the per-rank batch changes kernel efficiency)"


def superlinear_cause(row: Row, ref: Row) -> str:
    """Why a point is more than 100% efficient against the reference, per rank or per core: the likely cause."""
    if ref.shared_host:  # its ranks shared cores, with each other or with another job: it measured slow
        return f"the reference `{ref.point}` shared its machine's cores (see Shared host), so it measured slow"
    if noisy(ref):
        return (f"the reference `{ref.point}` is noisy (step time p90 {ref.step_time_p90_s / ref.step_time_p50_s:.2f}x "
                "p50: other load on its machine?), so it measured slow")
    if row.batch_per_rank < ref.batch_per_rank:
        return (f"each rank computes {row.batch_per_rank:g} sequence(s) a step against the reference's "
                f"{ref.batch_per_rank:g}: a smaller working set fits the caches better")
    return "faster per rank than the reference at the same work: measure both again"


def figures(model: FittedModel, s: Shape, ref: Shape) -> dict[str, float]:
    """The model's figures for one shape: the one computation behind every model figure of the report (the
    model-error table, the prediction tables, the plots, TensorBoard)."""
    if not s.feasible:
        return dict.fromkeys(FIGURES, math.nan)
    return dict(zip(FIGURES, (model.step_time(s), model.compute_time(s), model.comm_time(s), model.tokens_per_s(s),
                              model.efficiency(s, ref))))


def predict(model: FittedModel, ref: Shape, kept: str, nodes: Iterable[int], rows: Sequence[Row],
            shapes: Sequence[Shape]) -> list[dict[str, Any]]:
    """Predicted rows at `nodes` (and the measured node counts) with the reference's global batch kept (strong)
    or its per-rank batch kept (weak), on machines of their own; at a node count measured with the reference's
    ranks per node, the model of that point as it ran (its host and cores: `as_run`), as the model-error table
    states it. `ref`, `rows` and `shapes`: as measured."""
    as_run = ref
    alike = {r.nodes: (r, s) for r, s in zip(rows, shapes) if r.tasks_per_node == ref.tasks_per_node}
    measured = {n: p for n, p in alike.items() if kept == "strong" or n == ref.nodes}  # weak: only the reference
    ref = scaled_shape(ref, ref.nodes, kept)
    out = []
    for n in sorted(set(nodes) | set(alike)):  # every measured node count has its row, as run where it applies
        row, shape = measured.get(n, (None, None))
        try:
            s = shape or scaled_shape(ref, n, kept)
        except ConfigError:  # the layout cannot run on that many ranks (strategy=single on more than one)
            continue
        entry: dict[str, Any] = {"scaling": kept, "nodes": n, "ranks": s.ranks, "global_batch": s.global_batch,
                                 "feasible": s.feasible, "as_run": row is not None}
        entry.update(figures(model, s, as_run if row else ref))
        entry["measured_step_time_s"] = row.step_time_p50_s if row else None
        entry["measured_efficiency"] = row.efficiency if row else None
        out.append(entry)
    return out
