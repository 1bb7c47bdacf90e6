"""The report of a run folder or a sweep folder, rebuilt from the files in the run folders alone.

    python -m launch.report RUN_OR_SWEEP_DIR

The package: points.py reads run folders, rows.py summarises each point, compare.py ranks the points of a
sweep over other keys, perf_model.py and fit.py model the step time, model.py holds a report, and markdown.py,
outputs.py (CSV, PNG) and tensorboard.py render it; this module builds and writes it.

A sweep folder holds one run folder per point (`nodes=1/`, `nodes=2/`, `train.lr=1e-3/`, ...). The report fits
the sweep: when the node or rank count varies it is a scaling report (throughput, efficiency, stragglers, a fitted
performance model with its error on every point, and predictions at 8 to 1,024 nodes); when other keys vary it
compares the points on validation loss, loss curves and tokens/s; when both vary, both. Points whose "nodes" share
one machine are marked as such (see launch.report.points).

The report goes to `DIR/report/` (scaling.md, CSV files, model.json, PNG plots) and `DIR/tensorboard/scaling/`
(a TensorBoard run: the plots as images and the tables as text, then a custom-scalars dashboard), so
`tensorboard --logdir DIR` shows it next to the training curves. The sweep launcher calls `write_report(sweep_dir)`
when a sweep finishes; the offline command runs the same function on the same files, so both give the same report.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpt.config.report import ReportConfig
from gpt.config.parse import section
from gpt.config.sections import StragglerConfig
from gpt.config.tracking import TrackingConfig
from gpt.run_folder import RunFolder
from gpt.train.tracker import open_tracker
from launch.report import outputs as report_outputs
from launch.report import tensorboard as report_tensorboard
from launch.report.compare import CompareRow, compare_rows, varying_keys
from launch.report.model_fit import figures, fit_points, predict
from launch.report.markdown import markdown
from launch.report.contents import Report
from launch.report.points import PointResult, find_run_folders, get, load_point, mark_concurrent
from launch.report.rows import Row, add_efficiency, scaling_mode, shape_of, summarize

log = logging.getLogger(__name__)

OUTPUTS = {"scaling.md", "scaling.csv", "prediction.csv", "model.json", "comparison.csv", "loss_curves.png",
           "throughput.png", "efficiency.png", "step_time_per_rank.png", "prediction.png"}


def load_points(root: Path) -> list[PointResult]:
    folders = find_run_folders(root)
    if not folders:
        raise FileNotFoundError(f"{root}: no run folder (config.yaml next to metrics/) at or under it")
    points = [p for p in (load_point(f, root) for f in folders) if any(p.records.values())]
    if not points:
        raise FileNotFoundError(f"{root}: the run folders hold no train records yet")
    mark_concurrent(points)
    return sorted(points, key=lambda p: (p.ranks, p.nodes, p.name))


def build_report(root: Path, config: ReportConfig | None = None) -> Report:
    root = Path(os.path.abspath(root))  # `.` has no name to title the report with (symlinks kept: no resolve())
    points = load_points(root)
    first = points[0].config
    config = config or section(ReportConfig, "report", get(first, "report"))
    straggler_config = section(StragglerConfig, "stragglers", get(first, "stragglers"))
    rows = [summarize(p, config.skip_windows, straggler_config) for p in points]
    keys = varying_keys(points)
    rep = Report(root, points, rows, config, straggler_config, keys, True, [])
    # a scaling report unless only other keys than the node and rank counts vary
    rep.scaling = len({(r.nodes, r.ranks) for r in rows}) > 1 or not rep.compared_keys
    if rep.compared_keys:
        # each point labelled with every key that varies, nodes too: two points that differ only in their node
        # count would otherwise share a label in the table, comparison.csv and the plot's legend
        rep.compare = compare_rows(points, keys, [r.tokens_per_s for r in rows])
    if rep.scaling:
        add_scaling(rep)
    return rep


def add_scaling(rep: Report) -> None:
    """Efficiency, the fitted model with its error on every point, and weak (and strong) predictions."""
    rep.mode = scaling_mode(rep.rows)
    rep.reference = add_efficiency(rep.rows)
    rep.shapes = [shape_of(p) for p in rep.points]
    rep.model = fit_points(rep.points, rep.rows, rep.shapes, rep.config.network, rep.config.skip_windows)
    ref_shape = rep.shapes[rep.rows.index(rep.reference)]
    for row, shape in zip(rep.rows, rep.shapes):
        row.predicted_efficiency = figures(rep.model, shape, ref_shape)["efficiency"]
    rep.predictions = predict(rep.model, ref_shape, "weak", rep.config.predict_nodes, rep.rows, rep.shapes)
    if rep.mode == "strong":
        rep.predictions += predict(rep.model, ref_shape, "strong", rep.config.predict_nodes, rep.rows, rep.shapes)


def _csv(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()


def write_report(run_or_sweep_dir: str | Path, config: ReportConfig | None = None) -> Path:
    """Write the report of a run or sweep folder; returns the report folder. Same files offline or at sweep end."""

    rep = build_report(Path(run_or_sweep_dir), config)
    out = RunFolder(rep.root).report
    out.mkdir(parents=True, exist_ok=True)
    if rep.scaling:
        (out / "scaling.csv").write_text(_csv([asdict(r) for r in rep.rows], list(Row.__dataclass_fields__)))
        (out / "prediction.csv").write_text(_csv(rep.predictions, list(rep.predictions[0])))
        (out / "model.json").write_text(json.dumps({"mode": rep.mode, "reference": rep.reference.point,
                                                    **rep.model.as_dict()}, indent=1) + "\n")
    if rep.compare:
        (out / "comparison.csv").write_text(_csv([asdict(r) for r in rep.compare],
                                                 list(CompareRow.__dataclass_fields__)))
    text = markdown(rep)
    (out / "scaling.md").write_text(text)
    images = report_outputs.plots(rep, out)
    written = {"scaling.md", *images} | ({"scaling.csv", "prediction.csv", "model.json"} if rep.scaling else set()) | (
        {"comparison.csv"} if rep.compare else set())
    for stale in OUTPUTS - written:  # a rebuilt report of another kind leaves nothing of the old one behind
        (out / stale).unlink(missing_ok=True)
    report_tensorboard.write_run(rep, RunFolder(rep.root).scaling_board, text, images)
    attach_to_trackers(rep.points, out)
    return out


def attach_to_trackers(points: Sequence[PointResult], report: Path) -> None:
    """The report folder as an artifact of each point's tracker run (tracking.kind set): a sweep's report sits
    next to every point's curves."""
    for p in points:
        tracking = section(TrackingConfig, "tracking", get(p.config, "tracking"))
        tracker = open_tracker(tracking, p.path, str(get(p.config, "run") or p.path.name), None)
        if tracker is not None:
            tracker.attach(report, "report")
            tracker.close()
