"""The scaling report's PNG plots and its TensorBoard run (scalars by node count, and a custom-scalars layout)."""
from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launch.report import Report

# The scaling dashboard (TensorBoard's CUSTOM SCALARS tab). Multiline entries are regular expressions, anchored so
# that "scaling/tokens_per_s" does not also match "scaling/tokens_per_s_ideal". The "training" category draws the
# per-window straggler figures rank 0 logs during training (gpt.stragglers) from every run under the logdir.
LAYOUT = {
    "scaling": {
        "throughput vs nodes (tokens/s, ideal = linear from the smallest point)":
            ["Multiline", [r"^scaling/tokens_per_s$", r"^scaling/tokens_per_s_ideal$", r"^model/tokens_per_s$"]],
        "efficiency vs nodes (measured, model)": ["Multiline", [r"^scaling/efficiency$", r"^model/efficiency$"]],
        "step time p50 [min, p90] vs nodes (s)":
            ["Margin", ["scaling/step_time_p50_s", "scaling/step_time_min_s", "scaling/step_time_p90_s"]],
        "step time: measured p50 vs model (s)": ["Multiline", [r"^scaling/step_time_p50_s$", r"^model/step_time_s$"]],
        "tokens/s per rank and MFU": ["Multiline", [r"^scaling/tokens_per_s_per_rank$", r"^scaling/mfu$"]],
        "stragglers and communication fraction":
            ["Multiline", [r"^scaling/stragglers$", r"^scaling/comm_fraction$"]],
    },
    "stragglers during training": {
        "step time min / median / max over ranks (s)":
            ["Margin", ["stragglers/step_time_median_s", "stragglers/step_time_min_s", "stragglers/step_time_max_s"]],
        "per-rank step time (s)": ["Multiline", [r"^rank_step_time_s/"]],
        "per-rank busy time (s)": ["Multiline", [r"^rank_busy_s/"]],
        "stragglers (chronic) and lagging ranks": ["Multiline", [r"^stragglers/count$", r"^stragglers/lagging$"]],
    },
}


MAX_BOXES = 64


def _log2_nodes(ax, nodes) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(nodes))))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))


def plots(rep: "Report", out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rep.rows, key=lambda r: (r.nodes, r.ranks))
    ref = rep.reference
    nodes = [r.nodes for r in rows]
    mode = rep.mode

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(nodes, [r.tokens_per_s for r in rows], "o-", label="measured")
    ax.plot(nodes, [ref.tokens_per_s * r.ranks / ref.ranks for r in rows], "k--", label="ideal (linear)")
    ax.plot(nodes, [r.tokens_per_step / r.predicted_step_time_s for r in rows],
            "x:", label="model")
    ax.set(xlabel="nodes", ylabel="tokens/s (all ranks)", title=f"Throughput vs nodes ({mode})")
    ax.set_xticks(nodes)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)

    preds = [p for p in rep.predictions if p["feasible"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["nodes"] for p in preds], [100 * p["efficiency"] for p in preds], "x:", label="model (predicted)")
    ax.plot(nodes, [100 * r.efficiency for r in rows], "o-", label="measured")
    ax.axhline(100, color="k", ls="--", lw=0.8, label="ideal")
    _log2_nodes(ax, nodes + [p["nodes"] for p in preds])
    ax.set(xlabel="nodes", ylabel="efficiency (%)", title=f"Efficiency vs nodes ({mode}, vs {ref.nodes} node(s))")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "efficiency.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(rep.points), figsize=(max(4, 3.2 * len(rep.points)), 3.6), squeeze=False,
                             sharey=True)
    from launch.report import steady

    for ax, point in zip(axes[0], rep.points):
        ranks = sorted(point.records)
        data = [[r["step_time_s"] * 1e3 for r in steady(point.records[k], rep.config.skip_windows)] for k in ranks]
        title = f"{point.name}\n{point.nodes} node(s), {point.ranks} rank(s)"
        if len(ranks) <= MAX_BOXES:
            ax.boxplot(data, tick_labels=[str(k) for k in ranks])
            ax.set(title=title, xlabel="rank")
        else:  # too many ranks for a box each: the distribution of the ranks' medians
            ax.hist([statistics.median(d) for d in data if d], bins=30, orientation="horizontal")
            ax.set(title=title, xlabel="ranks (median over windows)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("step time (ms) per window")
    fig.tight_layout()
    fig.savefig(out / "step_time_per_rank.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["nodes"] for p in preds]
    ax.stackplot(xs, [p["compute_s"] for p in preds], [p["comm_s"] for p in preds],
                 labels=["model: compute", "model: communication"], alpha=0.5)
    ax.plot(nodes, [r.step_time_p50_s for r in rows], "ko", label="measured p50")
    _log2_nodes(ax, nodes + xs)
    ax.set(xlabel="nodes", ylabel="step time (s)", title="Step time: model and measurements")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "prediction.png", dpi=100)
    plt.close(fig)


def tensorboard_run(rep: "Report", folder: Path, text: str) -> None:
    """A fresh TensorBoard run: scalars with the node count as the step, the layout, and the Markdown report."""
    from torch.utils.tensorboard import SummaryWriter

    if folder.exists():
        shutil.rmtree(folder)  # a rebuilt report replaces the old run instead of doubling its points
    writer = SummaryWriter(log_dir=str(folder))
    ref = rep.reference
    for r in sorted(rep.rows, key=lambda r: (r.nodes, r.ranks)):
        n = r.nodes
        scalars = {
            "scaling/tokens_per_s": r.tokens_per_s,
            "scaling/tokens_per_s_ideal": ref.tokens_per_s * r.ranks / ref.ranks,
            "scaling/tokens_per_s_per_rank": r.tokens_per_s_rank,
            "scaling/efficiency": r.efficiency,
            "scaling/step_time_p50_s": r.step_time_p50_s,
            "scaling/step_time_p90_s": r.step_time_p90_s,
            "scaling/step_time_min_s": r.step_time_min_s,
            "scaling/step_time_max_s": r.step_time_max_s,
            "scaling/stragglers": r.stragglers,
            "scaling/ranks": r.ranks,
            "scaling/mfu": r.mfu,
            "scaling/comm_fraction": r.comm_fraction,
        }
        for tag, value in scalars.items():
            if value is not None and math.isfinite(value):
                writer.add_scalar(tag, value, n)
    for p in rep.predictions:
        if p["feasible"]:
            writer.add_scalar("model/step_time_s", p["step_time_s"], p["nodes"])
            writer.add_scalar("model/tokens_per_s", p["tokens_per_s"], p["nodes"])
            writer.add_scalar("model/efficiency", p["efficiency"], p["nodes"])
    writer.add_custom_scalars(LAYOUT)
    writer.add_text("scaling/report", text)
    writer.close()
