"""The report as a TensorBoard run (`DIR/tensorboard/scaling`): exact figures first, then the dashboard.

- IMAGES: the report's PNG plots, as they are in `report/`.
- TEXT: `report/1_summary` (what was measured: shared-host note, model error, or the ranked comparison),
  `report/2_tables` (the measured and predicted tables) and `report/3_full` (all of scaling.md).
- CUSTOM SCALARS: charts of scalars logged with the node count as the step. TensorBoard smooths them (0.6 by
  default), which misleads on a curve of two or three points: the category titles say where the exact figures are.
  Only charts with something to draw are laid out, and a chart missing a series says why (MFU on a CPU).
"""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launch import report_markdown as md
from launch.report_data import REPORT_DIR

if TYPE_CHECKING:
    from launch.report import Report

EXACT = "smoothed: set smoothing to 0, or read the exact figures in IMAGES and TEXT of run tensorboard/scaling"
STRAGGLERS = {
    "step time min / median / max over ranks (s)":
        ["Margin", ["stragglers/step_time_median_s", "stragglers/step_time_min_s", "stragglers/step_time_max_s"]],
    "per-rank step time (s)": ["Multiline", [r"^rank_step_time_s/"]],
    "per-rank busy time (s)": ["Multiline", [r"^rank_busy_s/"]],
    "stragglers (chronic) and lagging ranks": ["Multiline", [r"^stragglers/count$", r"^stragglers/lagging$"]],
}


def scaling_charts(rep: Report) -> dict[str, list[Any]]:
    """Multiline entries are regular expressions, anchored so that "scaling/tokens_per_s" does not also match
    "scaling/tokens_per_s_ideal"."""
    own = "strong" if rep.mode == "strong" else "weak"  # the predictions that keep what the sweep kept
    kinds = ["strong", "weak"] if own == "strong" else ["weak"]
    charts: dict[str, list[Any]] = {
        f"throughput vs nodes (tokens/s; ideal = linear from the smallest point; model, {own} scaling)":
            ["Multiline", [r"^scaling/tokens_per_s$", r"^scaling/tokens_per_s_ideal$", rf"^model_{own}/tokens_per_s$"]],
        f"efficiency vs nodes (measured; model, {' and '.join(kinds)} scaling)":
            ["Multiline", [r"^scaling/efficiency$", *(rf"^model_{k}/efficiency$" for k in kinds)]],
        "step time p50 [min, p90] vs nodes (s)":
            ["Margin", ["scaling/step_time_p50_s", "scaling/step_time_min_s", "scaling/step_time_p90_s"]],
        "step time: measured p50 vs model (s)":
            ["Multiline", [r"^scaling/step_time_p50_s$", r"^scaling/model_step_time_s$"]],
    }
    if any(r.mfu is not None for r in rep.rows):
        charts["tokens/s per rank and MFU"] = ["Multiline", [r"^scaling/tokens_per_s_per_rank$", r"^scaling/mfu$"]]
    else:
        charts["tokens/s per rank (MFU n/a: no peak FLOP/s is known for this device, e.g. a CPU)"] = [
            "Multiline", [r"^scaling/tokens_per_s_per_rank$"]]
    if any(r.comm_fraction is not None for r in rep.rows):
        charts["stragglers and communication fraction"] = [
            "Multiline", [r"^scaling/stragglers$", r"^scaling/comm_fraction$"]]
    else:
        charts["stragglers (communication fraction n/a: comm_s not recorded)"] = ["Multiline", [r"^scaling/stragglers$"]]
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


def scalars(rep: Report) -> list[tuple[str, float, int]]:
    """(tag, value, node count) of every finite figure of the scaling report."""
    out = []
    ref = rep.reference
    for r in sorted(rep.rows, key=lambda r: (r.nodes, r.ranks)):
        figures = {"tokens_per_s": r.tokens_per_s, "tokens_per_s_ideal": ref.tokens_per_s * r.ranks / ref.ranks,
                   "tokens_per_s_per_rank": r.tokens_per_s_rank, "efficiency": r.efficiency,
                   "step_time_p50_s": r.step_time_p50_s, "step_time_p90_s": r.step_time_p90_s,
                   "step_time_min_s": r.step_time_min_s, "step_time_max_s": r.step_time_max_s,
                   "model_step_time_s": r.predicted_step_time_s, "stragglers": r.stragglers, "ranks": r.ranks,
                   "mfu": r.mfu, "comm_fraction": r.comm_fraction}
        out += [(f"scaling/{k}", v, r.nodes) for k, v in figures.items()]
    for p in rep.predictions:
        if p["feasible"]:
            out += [(f"model_{p['scaling']}/{k}", p[k], p["nodes"]) for k in ("step_time_s", "tokens_per_s",
                                                                                "efficiency")]
    return [(t, float(v), n) for t, v, n in out if v is not None and math.isfinite(v)]


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
        with Image.open(rep.root / REPORT_DIR / name) as im:
            writer.add_image(f"report/{Path(name).stem}", np.asarray(im.convert("RGB")), 0, dataformats="HWC")
    for tag, text in texts(rep, full_text).items():
        writer.add_text(tag, text)
    if rep.scaling:
        for tag, value, nodes in scalars(rep):
            writer.add_scalar(tag, value, nodes)
    writer.add_custom_scalars(layout(rep))
    writer.close()
