"""The report as a TensorBoard run (`DIR/tensorboard/scaling`): exact figures first, then the dashboard.

- IMAGES: the report's PNG plots, as they are in `report/`.
- TEXT: `report/1_summary` (what was measured: shared-host note, model error, or the ranked comparison),
  `report/2_tables` (the measured and predicted tables) and `report/3_full` (all of scaling.md).
- CUSTOM SCALARS: charts of scalars logged with the node count as the step, the measured figures in this run, the
  model's in `scaling/model` and linear scaling in `scaling/ideal`, so that each is a colour of its own.
  TensorBoard smooths them (0.6 by default), which misleads on a curve of two or three points: the category
  titles say where the exact figures are.
  Only charts with something to draw are laid out, and a chart missing a series says why (MFU on a CPU).
"""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

from gpt.run_folder import RunFolder
from launch.report import markdown as md
from launch.report.contents import Report

EXACT = ("smoothed and outlier-clipped: set smoothing to 0 and untick 'Ignore outliers', or read the exact figures "
         "in IMAGES and TEXT of run tensorboard/scaling")
STRAGGLERS = {
    "step time min / median / max over ranks (s)":
        ["Margin", ["stragglers/step_time_median_s", "stragglers/step_time_min_s", "stragglers/step_time_max_s"]],
    "per-rank step time (s)": ["Multiline", [r"^rank_step_time_s/"]],
    "per-rank busy time (s)": ["Multiline", [r"^rank_busy_s/"]],
    "stragglers (chronic) and lagging ranks": ["Multiline", [r"^stragglers/count$", r"^stragglers/lagging$"]],
}


def scaling_charts(rep: Report) -> dict[str, list[Any]]:
    """Charts of one tag drawn from several runs (measured, model, ideal: one colour each). Multiline entries are
    anchored regular expressions, so that "scaling/tokens_per_s" does not also match "scaling/tokens_per_s_per_rank"."""
    kinds = " and ".join(k for k in ("weak", "strong") if any(p["scaling"] == k for p in rep.predictions))
    charts: dict[str, list[Any]] = {
        "throughput vs nodes (tokens/s; runs: measured, model, ideal = linear from the smallest point)":
            ["Multiline", [r"^scaling/tokens_per_s$"]],
        "efficiency vs nodes (runs: measured, model, ideal)": ["Multiline", [r"^scaling/efficiency$"]],
        "step time p50 vs nodes (s; runs: measured, model; per-rank spread: IMAGES, step_time_per_rank)":
            ["Multiline", [r"^scaling/step_time_p50_s$"]],
        f"predicted efficiency at up to {max(rep.config.predict_nodes):,} nodes ({kinds} scaling)":
            ["Multiline", [r"^predicted_(weak|strong)/efficiency$"]],
        f"predicted step time at up to {max(rep.config.predict_nodes):,} nodes (s; {kinds} scaling)":
            ["Multiline", [r"^predicted_(weak|strong)/step_time_s$"]],
    }
    if any(r.mfu is not None for r in rep.rows):
        charts["tokens/s per rank (runs: measured, model, ideal) and MFU"] = [
            "Multiline", [r"^scaling/tokens_per_s_per_rank$", r"^scaling/mfu$"]]
    else:
        charts["tokens/s per rank (runs: measured, model, ideal; MFU n/a: no peak FLOP/s is known for this device, "
               "e.g. a CPU)"] = [
            "Multiline", [r"^scaling/tokens_per_s_per_rank$"]]
    if any(r.comm_fraction is not None for r in rep.rows):
        charts["stragglers and communication fraction"] = [
            "Multiline", [r"^scaling/stragglers$", r"^scaling/comm_fraction$"]]
    else:
        title = "stragglers (communication fraction n/a: comm_s not recorded)"
        charts[title] = ["Multiline", [r"^scaling/stragglers$"]]
    return charts


def layout(rep: Report) -> dict[str, dict[str, list[Any]]]:
    out: dict[str, dict[str, list[Any]]] = {}
    if rep.compare:
        charts = {"training loss, every point": ["Multiline", [r"^train/loss$"]],
                  "tokens/s, every point": ["Multiline", [r"^train/tokens_per_s$"]]}
        if any(p.val_loss for p in rep.points):
            charts["validation loss, every point"] = ["Multiline", [r"^val/loss$"]]
        out[f"comparison: {', '.join(rep.compared_keys)} ({EXACT})"] = charts
    if rep.scaling:
        out[f"scaling: x = nodes ({EXACT})"] = scaling_charts(rep)
    if any(p.ranks > 1 for p in rep.points):
        out["stragglers during training (multi-rank points)"] = STRAGGLERS
    return out


def scalars(rep: Report) -> dict[str, list[tuple[str, float, int]]]:
    """Run (under the scaling run) -> (tag, value, node count) of every finite figure: "" the measured figures,
    "model" the model at the measured points and its predictions, "ideal" linear scaling from the reference."""
    runs: dict[str, list[tuple[str, Any, int]]] = {"": [], "model": [], "ideal": []}
    ref = rep.reference
    for r in sorted(rep.rows, key=lambda r: (r.nodes, r.ranks)):
        measured = {"tokens_per_s": r.tokens_per_s, "tokens_per_s_per_rank": r.tokens_per_s_rank,
                    "efficiency": r.efficiency, "step_time_p50_s": r.step_time_p50_s,
                    "step_time_p90_s": r.step_time_p90_s, "step_time_min_s": r.step_time_min_s,
                    "step_time_max_s": r.step_time_max_s, "stragglers": r.stragglers, "ranks": r.ranks,
                    "mfu": r.mfu, "comm_fraction": r.comm_fraction}
        model_tokens = r.tokens_per_step / r.predicted_step_time_s
        model = {"tokens_per_s": model_tokens, "tokens_per_s_per_rank": model_tokens / r.ranks,
                 "efficiency": r.predicted_efficiency, "step_time_p50_s": r.predicted_step_time_s}
        runs[""] += [(f"scaling/{k}", v, r.nodes) for k, v in measured.items()]
        runs["model"] += [(f"scaling/{k}", v, r.nodes) for k, v in model.items()]
        runs["ideal"] += [("scaling/tokens_per_s", ref.tokens_per_s * r.ranks / ref.ranks, r.nodes),
                          ("scaling/tokens_per_s_per_rank", ref.tokens_per_s_rank, r.nodes),
                          ("scaling/efficiency", 1.0, r.nodes)]
    for p in rep.predictions:
        if p["feasible"]:
            runs["model"] += [(f"predicted_{p['scaling']}/{k}", p[k], p["nodes"]) for k in ("step_time_s",
                                                                                             "efficiency")]
    return {run: [(t, float(v), n) for t, v, n in figures if v is not None and math.isfinite(v)]
            for run, figures in runs.items()}


def _without_image_links(text: str) -> str:
    """TensorBoard cannot show `![...](plot.png)` from the report folder: point to the IMAGES tab instead."""
    return re.sub(r"!\[([^]]*)\]\(([^)]+)\.png\)", r"(plot: \1, IMAGES tab, report/\2)", text)


def texts(rep: Report, full: str) -> dict[str, str]:
    summary = [md.intro(rep), md.shared_host_note(rep)]
    tables = []
    if rep.compare:
        summary.append(md.comparison(rep))
    if rep.scaling:
        summary.append(md.model_error(rep))
        tables += [md.scaling_table(rep), md.prediction_tables(rep)]
    out = {"report/1_summary": "\n".join(s for s in summary if s)}
    if tables:
        out["report/2_tables"] = "\n".join(tables)
    out["report/3_full"] = full
    return {tag: _without_image_links(text) for tag, text in out.items()}


def write_run(rep: Report, folder: Path, full_text: str, images: list[str]) -> None:
    """A fresh TensorBoard run: images and text first, then the scalars and their custom-scalars layout."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    if folder.exists():
        shutil.rmtree(folder)  # a rebuilt report replaces the old run instead of doubling its points
    writer = SummaryWriter(log_dir=str(folder))
    for name in images:
        with Image.open(RunFolder(rep.root).report / name) as im:
            writer.add_image(f"report/{Path(name).stem}", np.asarray(im.convert("RGB")), 0, dataformats="HWC")
    for tag, text in texts(rep, full_text).items():
        writer.add_text(tag, text)
    writer.add_custom_scalars(layout(rep))
    runs = scalars(rep) if rep.scaling else {}
    for tag, value, nodes in runs.pop("", []):
        writer.add_scalar(tag, value, nodes)
    writer.close()
    for run, figures in runs.items():
        with SummaryWriter(log_dir=str(folder / run)) as run_writer:
            for tag, value, nodes in figures:
                run_writer.add_scalar(tag, value, nodes)
