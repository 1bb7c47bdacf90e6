"""The report's PNG plots: scaling (throughput, efficiency, per-rank step times, prediction) and comparison (loss
curves of every point overlaid)."""
from __future__ import annotations

import statistics
from pathlib import Path

from launch.report.contents import Report
from launch.report.rows import steady

MAX_BOXES = 64
# A large sweep's plots stay legible: at most this many panels (above it, the points of equal node and rank
# counts share one) and this many labelled loss curves (the best and the worst; the others thin and grey).
MAX_PANELS = 8
MAX_CURVES = 10
DPI = 100


def _log2_nodes(ax, nodes) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(nodes))))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))


def _mark_shared(ax, rows, ys) -> None:
    """Ring the points whose "nodes" share one machine: they measure no network."""
    shared = [(r.nodes, y) for r, y in zip(rows, ys) if r.shared_host]
    if shared:
        ax.plot(*zip(*shared), "o", ms=13, mfc="none", mec="red", label="shared host (no network measured)")


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.name


def plots(rep: Report, out: Path) -> list[str]:
    """Write the report's plots into `out`; returns their file names, in the order the report shows them."""
    import matplotlib

    matplotlib.use("Agg")
    names = []
    if rep.compare:
        names.append(loss_curves(rep, out / "loss_curves.png"))
    if rep.scaling:
        names += [throughput(rep, out / "throughput.png"), efficiency(rep, out / "efficiency.png"),
                  step_time_per_rank(rep, out / "step_time_per_rank.png"), prediction(rep, out / "prediction.png")]
    return names


def loss_curves(rep: Report, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {r.point: r.label for r in rep.compare}
    ranked = [r.point for r in rep.compare]  # best first
    named = set(ranked if len(ranked) <= MAX_CURVES else ranked[:MAX_CURVES // 2] + ranked[-(MAX_CURVES // 2):])
    points = sorted(rep.points, key=lambda p: (p.name in named, labels[p.name]))  # the named ones drawn on top
    for i, point in enumerate(p for p in points if p.name in named):
        _loss_lines(ax, point, dict(color=f"C{i % 10}"), labels[point.name])
    for point in (p for p in points if p.name not in named):
        _loss_lines(ax, point, dict(color="0.75", lw=0.6, ms=2), None)
    title = "Loss per point (train: lines; validation: markers)"
    if len(named) < len(ranked):
        title = f"Loss: the {len(named) // 2} best and worst of {len(ranked)} points (others grey)"
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper right")  # "best" searches every line's points: slow with hundreds
    return _save(fig, path)


def _loss_lines(ax, point, style: dict, label: str | None) -> None:
    if point.train_loss:
        ax.plot(*zip(*point.train_loss), "-", **style, label=f"{label} (train)" if label else None)
    if point.val_loss:
        ax.plot(*zip(*point.val_loss), "o--", **style, label=f"{label} (val)" if label else None)


def throughput(rep: Report, path: Path) -> str:
    import matplotlib.pyplot as plt

    rows, ref = sorted(rep.rows, key=lambda r: (r.nodes, r.ranks)), rep.reference
    nodes = [r.nodes for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(nodes, [r.tokens_per_s for r in rows], "o-", label="measured")
    _mark_shared(ax, rows, [r.tokens_per_s for r in rows])
    ax.plot(nodes, [ref.tokens_per_s * r.ranks / ref.ranks for r in rows], "k--", label="ideal (linear)")
    ax.plot(nodes, [r.tokens_per_step / r.predicted_step_time_s for r in rows], "x:", label="model")
    ax.set(xlabel="nodes", ylabel="tokens/s (all ranks)", title=f"Throughput vs nodes ({rep.mode})")
    ax.set_xticks(nodes)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def efficiency(rep: Report, path: Path) -> str:
    import matplotlib.pyplot as plt

    rows = sorted(rep.rows, key=lambda r: (r.nodes, r.ranks))
    nodes = [r.nodes for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = list(nodes)
    for kept, style in (("strong", "x:"), ("weak", "+-.")):
        preds = [p for p in rep.predictions if p["scaling"] == kept and p["feasible"]]
        if preds:
            xs += [p["nodes"] for p in preds]
            ax.plot([p["nodes"] for p in preds], [100 * p["efficiency"] for p in preds], style,
                    label=f"model, {kept} scaling")
    ax.plot(nodes, [100 * r.efficiency for r in rows], "o-", label=f"measured ({rep.mode})")
    _mark_shared(ax, rows, [100 * r.efficiency for r in rows])
    ax.axhline(100, color="k", ls="--", lw=0.8, label="ideal")
    _log2_nodes(ax, xs)
    ax.set(xlabel="nodes", ylabel="efficiency (%)", title=f"Efficiency vs nodes (vs {rep.reference.nodes} node(s))")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def step_time_per_rank(rep: Report, path: Path) -> str:
    import matplotlib.pyplot as plt

    panels = _step_time_panels(rep)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4, 3.2 * len(panels)), 3.6), squeeze=False, sharey=True)
    for ax, (title, by_rank) in zip(axes[0], panels):
        ranks = sorted(by_rank)
        data = [by_rank[k] for k in ranks]
        if len(ranks) <= MAX_BOXES:
            ax.boxplot(data, tick_labels=[str(k) for k in ranks])
            ax.set(title=title, xlabel="rank")
        else:  # too many ranks for a box each: the distribution of the ranks' medians
            ax.hist([statistics.median(d) for d in data if d], bins=30, orientation="horizontal")
            ax.set(title=title, xlabel="ranks (median over windows)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("step time (ms) per window")
    return _save(fig, path)


def _step_time_panels(rep: Report) -> list[tuple[str, dict[int, list[float]]]]:
    """(title, rank -> steady step times in ms) per point; above MAX_PANELS points, one panel per node and rank
    count, its ranks' windows pooled over the points that have that count."""
    def times(point, rank: int) -> list[float]:
        return [r["step_time_s"] * 1e3 for r in steady(point.records[rank], rep.config.skip_windows)]

    if len(rep.points) <= MAX_PANELS:
        return [(f"{p.name}\n{p.nodes} node(s), {p.ranks} rank(s)", {k: times(p, k) for k in p.records})
                for p in rep.points]
    groups: dict[tuple[int, int], list] = {}
    for p in rep.points:
        groups.setdefault((p.nodes, p.ranks), []).append(p)
    return [(f"{len(ps)} points pooled\n{nodes} node(s), {ranks} rank(s)",
             {k: [t for p in ps if k in p.records for t in times(p, k)] for k in range(ranks)})
            for (nodes, ranks), ps in sorted(groups.items())][:MAX_PANELS]


def prediction(rep: Report, path: Path) -> str:
    """Predicted step time split into compute and communication, one panel per kind of scaling predicted."""
    import matplotlib.pyplot as plt

    kinds = [k for k in ("strong", "weak") if any(p["scaling"] == k and p["feasible"] for p in rep.predictions)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    rows = sorted(rep.rows, key=lambda r: (r.nodes, r.ranks))
    for ax, kept in zip(axes[0], kinds):
        preds = [p for p in rep.predictions if p["scaling"] == kept and p["feasible"]]
        xs = [p["nodes"] for p in preds]
        ax.stackplot(xs, [p["compute_s"] for p in preds], [p["comm_s"] for p in preds],
                     labels=["model: compute", "model: communication"], alpha=0.5)
        ax.plot(xs, [p["step_time_s"] for p in preds], "x:", color="C3", label="model: step (as run where measured)")
        measured = [(p["nodes"], p["measured_step_time_s"]) for p in preds if p["measured_step_time_s"] is not None]
        if measured:
            ax.plot(*zip(*measured), "ko", label="measured p50")
        _log2_nodes(ax, xs + [r.nodes for r in rows if kept == "strong"])
        ax.set(xlabel="nodes", ylabel="step time (s)", title=f"Step time, {kept} scaling: model and measurements")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return _save(fig, path)
