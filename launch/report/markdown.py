"""The report as Markdown (`report/scaling.md`, and the text of the TensorBoard run)."""
from __future__ import annotations

import json
import os
import math
from collections.abc import Callable
from typing import Any

from launch.report.model_fit import TOLERANCE, superlinear_cause
from launch.report.contents import Report
from launch.report.perf_model import comm_volume
from gpt.resilience.goodput import RunGoodput, run_goodput
from gpt.run_folder import RunFolder, excluded_hosts
from launch.report.rows import BREAKDOWN, replay_stragglers

MODE_TEXT = {
    "weak": "**weak scaling**: the per-rank batch is fixed, so efficiency = t(ref) / t(n)",
    "strong": "**strong scaling**: the global batch is fixed, so efficiency = t(ref) x ranks(ref) / (t(n) x ranks(n))",
    "single point": "a single point: no scaling to measure; efficiency is 1 by definition",
    "mixed": "**mixed**: neither the global nor the per-rank batch is fixed across points; efficiency is tokens/s "
             "per rank against the smallest point",
}
MFU_NOTE = "MFU is n/a where no peak FLOP/s is known (CPU, unknown GPU)."
# A table of a large sweep shows its first and last rows (the ranked best and worst); the CSV files hold every row.
SHOWN_ROWS = 10


def shown(rows: list, where: str) -> tuple[list, str]:
    """The rows a table shows, and the line that stands for the rows left out (empty when none are)."""
    if len(rows) <= 2 * SHOWN_ROWS:
        return rows, ""
    return rows[:SHOWN_ROWS] + rows[-SHOWN_ROWS:], (
        f"| ... {len(rows) - 2 * SHOWN_ROWS} more point(s) between these rows: every point is in {where} |")


def _collapse(lines: list[str], gap: str) -> list[str]:
    """Rendered rows of shown(): the gap line between the first and the last ones."""
    return lines[:SHOWN_ROWS] + [gap] + lines[SHOWN_ROWS:] if gap else lines


def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def pct(v: float | None, signed: bool = False) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    if signed:
        return f"{100 * v:+.1f}%" if abs(v) >= 5e-4 else "0.0%"  # no "-0.0%" for a point fitted exactly
    return f"{100 * v:.1f}%"


def markdown(rep: Report) -> str:
    parts = [intro(rep), unfinished_note(rep), shared_host_note(rep)]
    if rep.compare:
        parts.append(comparison(rep))
    parts.append(downstream(rep))
    if rep.scaling:
        parts += [scaling_table(rep), stragglers(rep), model_section(rep), prediction_tables(rep)]
    parts += [goodput(rep), node_health(rep), traces(rep), plots(rep)]
    return "\n".join(p for p in parts if p)


def traces(rep: Report) -> str:
    """Each point's profiler traces (profile.steps), linked from the report folder: one per rank and attempt."""
    report_dir = RunFolder(rep.root).report
    lines = []
    for p in rep.points:
        found = RunFolder(p.path).profile_traces()
        links = ", ".join(f"[{t.parent.name}/{t.name.removesuffix('.pt.trace.json')}]"
                          f"({os.path.relpath(t, report_dir)})" for t in found)
        if links:
            lines.append(f"| {p.name} | {links} |")
    if not lines:
        return ""
    return "\n".join(["## Profiler traces\n", "torch.profiler traces of the steps `profile.steps` named, per attempt "
                      "and rank: open one in https://ui.perfetto.dev or TensorBoard's trace viewer "
                      "(docs/profiling.md).\n", "| point | traces |", "|---|---|", *lines]) + "\n"


def intro(rep: Report) -> str:
    n = len(rep.rows)
    if not rep.scaling:
        return (f"# Sweep report: {rep.root.name}\n\n{n} points; they differ in "
                f"{', '.join(f'`{k}`' for k in rep.keys)}.\n")
    ref = rep.reference
    swept = f" Swept: {', '.join(f'`{k}`' for k in rep.keys)}." if rep.keys else ""
    return (f"# Scaling report: {rep.root.name}\n\n{n} point(s); {MODE_TEXT[rep.mode]}.{swept} Reference: "
            f"`{ref.point}` ({ref.nodes} node(s), {ref.ranks} rank(s)). Steady state: the first "
            f"{rep.config.skip_windows} log window(s) of each rank are left out.\n")


def unfinished_note(rep: Report) -> str:
    """The points that have not finished: their figures are of the steps they ran (cancelled, stopped, running)."""
    lines = [f"`{p.name}` at {p.unfinished}" for p in rep.points if p.unfinished]
    if not lines:
        return ""
    return (f"> **Not finished.** {'; '.join(lines)}: the figures are of the steps run so far (the same command "
            "continues a run that stopped; one that failed or diverged says why in its run folder's logs).\n")


def shared_host_note(rep: Report) -> str:
    shared = [p for p in rep.points if p.shared_host]
    if not shared:
        return ""
    listed, gap = shown(shared, "scaling.csv's `shared_host` column")
    lines = [f"> **Shared host.** `{p.name}`: {p.shared_host}" + (f"; {p.threads} thread(s) per rank" if p.threads
             else "") + (f", {round(p.cores_per_rank, 2):g} core(s) each" if p.cores_per_rank else "") + "."
             for p in listed]
    if gap:
        lines.insert(SHOWN_ROWS, f"> ... {len(shared) - len(listed)} more point(s) that shared a host: every point is "
                                 "in scaling.csv's `shared_host` column")
    lines.append("> These points measure how ranks share one machine's cores (with each other, or with another point's "
                 f"ranks running at the same time) and its loopback, not network scaling. "
                 f"{_fit_of_shared(rep, len(shared))}")
    return "\n>\n".join(lines) + "\n"


def _fit_of_shared(rep: Report, shared: int) -> str:
    if not rep.scaling:
        return "This comparison fits no performance model."
    if shared < len(rep.points):
        return "The performance model leaves them out of its fit (compute and communication terms)."
    return "The performance model fits only its compute term from them, not its communication term."


def comparison(rep: Report) -> str:
    by_val = any(r.best_val_loss is not None for r in rep.compare)
    order = "best validation loss" if by_val else "final training loss (no point recorded a validation loss)"
    out = [f"## Comparison: {', '.join(rep.compared_keys)}\n", f"Ranked by {order}; lower is better.\n",
           "| rank | point | best val loss (step) | final val loss | final train loss | tokens/s | steps |",
           "|---|---|---|---|---|---|---|"]
    rows, gap = shown(rep.compare, "`comparison.csv`")
    lines = []
    for r in rows:
        best = f"{r.best_val_loss:.4f} ({r.best_val_step})" if r.best_val_loss is not None else "n/a"
        steps = f"{r.steps} (stopped early)" if r.stopped_early else r.steps
        lines.append(f"| {r.rank} | {r.label} | {best} | {fmt(r.final_val_loss, '.4f')} | "
                     f"{fmt(r.final_train_loss, '.4f')} | {r.tokens_per_s:,.0f} | {steps} |")
    out += _collapse(lines, gap)
    stopped = [f"- {r.label}: {r.stopped_early}" for r in rep.compare if r.stopped_early]
    if stopped:  # launcher.early_stop: which points it stopped, where and why; the same command with =none goes on
        out += ["", "Stopped early by the sweep's early stopping (the same command with `launcher.early_stop=none` "
                "trains them on):", "", *stopped]
    return "\n".join(out) + "\n\n![training and validation loss per point](loss_curves.png)\n"


def downstream(rep: Report) -> str:
    """Each point's newest eval.tasks scores (accuracy by summed log-likelihood, and per character)."""
    rows = [(p.name, name.removesuffix("/acc"), step, acc, p.tasks.get(name.replace("/acc", "/acc_norm"), (0, None))[1])
            for p in rep.points for name, (step, acc) in sorted(p.tasks.items()) if name.endswith("/acc")]
    if not rows:
        return ""
    out = ["## Downstream tasks\n", "Multiple-choice accuracy at the newest evaluation (`eval.tasks`, during training "
           "or by a checkpoint's evaluation job).\n",
           "| point | task | step | acc | acc_norm |", "|---|---|---|---|---|"]
    out += [f"| {point} | {task} | {step} | {pct(acc)} | {pct(norm)} |" for point, task, step, acc, norm in rows]
    return "\n".join(out) + "\n"


def scaling_table(rep: Report) -> str:
    out = ["## Measured\n",
           ("| point | nodes | ranks | strategy | global batch | batch/rank | tokens/s | tokens/s/rank | MFU | "
           "step p50 (s) | step p90 (s) | comm | stragglers | efficiency | per core | threads/rank | shared host |"),
           "|" + "---|" * 17]
    rows, gap = shown(rep.rows, "`scaling.csv`")
    lines = []
    for r in rows:
        strag = f"{r.stragglers} ({r.straggler_ranks})" if r.stragglers else "none"
        lines.append(f"| {r.point} | {r.nodes} | {r.ranks} | {r.strategy} | {r.global_batch} | {r.batch_per_rank:g} | "
                   f"{r.tokens_per_s:,.0f} | {r.tokens_per_s_rank:,.0f} | {pct(r.mfu)} | {r.step_time_p50_s:.4g} | "
                   f"{r.step_time_p90_s:.4g} | {pct(r.comm_fraction)} | {strag} | {pct(r.efficiency)} | "
                     f"{pct(r.efficiency_per_core)} | {fmt(r.threads)} | {'yes' if r.shared_host else 'no'} |")
    out += _collapse(lines, gap)
    breakdown = "; ".join(f"`{r.point}` " + ", ".join(
        f"{k.removesuffix('_s').replace('_time', '')} {fmt(getattr(r, k), '.3g')}" for k in BREAKDOWN)
        for r in rows) + ("; the other points' in scaling.csv" if gap else "")
    out.append(f"\nStep-time breakdown (medians, s): {breakdown}.\n")
    out.append(superlinear(rep))
    out.append(f"{MFU_NOTE} comm is the median fraction of the step spent waiting for the other ranks, measured "
               "where the wait happens (the host's flags all-reduce and the device's gradient reduction), n/a where "
               "the run did not record `comm_s`. Under FSDP, HSDP, tensor parallel, pipeline and ZeRO-3 the "
               "collectives run inside forward and backward: there comm holds only the wait the compute probe finds "
               "(for a slower rank), and the collectives' transfer time stays in compute. Per core: tokens/s per "
               "CPU core against the reference's; where "
               "ranks share one machine's cores (a shared host), this, not the per-rank efficiency, says how well "
               "they share them.\n")
    return "\n".join(out)


def superlinear(rep: Report) -> str:
    """A line for each point more than 100% efficient (superlinear), with the likely cause: never a silent figure."""
    lines = []
    for r in shown(rep.rows, "`scaling.csv`")[0]:
        above = [f"{what} {pct(e)}" for what, e in (("per rank", r.efficiency), ("per core", r.efficiency_per_core))
                 if e is not None and e > 1.0005]  # shown above 100.0%
        if above:
            lines.append(f"- `{r.point}` is above 100% ({', '.join(above)}): {superlinear_cause(r, rep.reference)}.")
    return "Efficiency above 100% (superlinear):\n\n" + "\n".join(lines) + "\n" if lines else ""


def stragglers(rep: Report) -> str:
    sc = rep.straggler_config
    out = ["## Stragglers\n", (f"Rule: a rank whose busy time (step time minus time in collectives, when recorded) "
           f"is more than {sc.threshold_pct:g}% above the median of the other ranks for {sc.windows} consecutive log "
           "windows.\n")]
    events = [f"- `{p.name}`: {e.message()}" for p in rep.points
              for e in replay_stragglers(p, sc, rep.config.skip_windows)[1]]
    out.append("\n".join(events) + "\n" if events else "No rank was a straggler at any point.\n")
    return "\n".join(out)


def model_section(rep: Report) -> str:
    m, net = rep.model, rep.model.network
    per = f"for a rank with {m.reference_cores:g} core(s)" if m.reference_cores else "per rank"
    out = ["## Performance model\n",
           ("step_time(n) = c x sequences_per_rank(n) x cores(ref) / cores(n) + k x comm(n), comm = latency + "
           "bytes / bandwidth for the strategy's collectives (see `launch/report/perf_model.py`).\n"),
           (f"- c = {m.compute_s_per_sequence:.4g} s per sequence {per}; k = {m.comm_scale:.3g} (1 = communication "
           f"as fast as the configured network); {m.method}; rms residual {m.residual_rms_s:.3g} s"),
           (f"- network (`report.network.*`): intra-node {net.intra_node_GBps:g} GB/s, {net.intra_node_latency_us:g} "
           f"us; inter-node {net.inter_node_GBps:g} GB/s, {net.inter_node_latency_us:g} us")]
    # the collectives each point's strategy lists, once per distinct list (their sizes change with the point), with
    # the points that run them
    seen: dict[str, list[str]] = {}
    for point, shape in zip(rep.points, rep.shapes):
        seen.setdefault(comm_volume(shape).description, []).append(f"`{point.name}`")
    out += [f"- collectives per step ({', '.join(names)}): {what}" for what, names in seen.items()]
    return "\n".join(out) + "\n\n" + model_error(rep)


def model_error(rep: Report) -> str:
    loo = len(rep.rows) >= 3
    flagged = [r for r in rep.rows if r.model_flag]
    head = (f"### Model error\n\nThe model against each measured step time (p50), fitted to every point"
            f"{' and, leave-one-out, to every other point' if loo else ' (leave-one-out needs 3 points or more)'}. "
            f"{len(rep.rows) - len(flagged)} of {len(rep.rows)} point(s) within {TOLERANCE:.0%}"
            f"{'; the likely cause of each miss is below the table' if flagged else ''}.\n")
    out = [head, ("| point | measured step (s) | model step (s) | error | leave-one-out step (s) | "
                  "leave-one-out error | within 10% |"), "|---|---|---|---|---|---|---|"]
    # the worst fits first when the table is collapsed, so that the misses stay in view
    ordered = rep.rows if len(rep.rows) <= 2 * SHOWN_ROWS else sorted(
        rep.rows, key=lambda r: 0 if math.isnan(r.model_error) else -abs(r.model_error))
    rows, gap = shown(ordered, "`scaling.csv`")
    lines = []
    for r in rows:
        loo_step = r.step_time_p50_s * (1 + r.loo_error) if r.loo_error is not None else None
        lines.append(f"| {r.point} | {r.step_time_p50_s:.4g} | {r.predicted_step_time_s:.4g} | "
                     f"{pct(r.model_error, signed=True)} | {fmt(loo_step, '.4g')} | {pct(r.loo_error, signed=True)} | "
                     f"{'**no**' if r.model_flag else 'yes'} |")
    out += _collapse(lines, gap)
    causes = [f"- `{r.point}` is off by more than 10%: {r.model_flag}." for r in shown(flagged, "`scaling.csv`")[0]]
    return "\n".join(out) + "\n" + ("\n" + "\n".join(causes) + "\n" if causes else "")


def prediction_tables(rep: Report) -> str:
    ref = rep.reference
    out = []
    for kept, title in (("weak", (f"Weak scaling: {ref.batch_per_rank:g} sequence(s) per data-parallel rank, as "
                                 f"`{ref.point}`")),
                        ("strong", f"Strong scaling: a global batch of {ref.global_batch} sequences, as measured")):
        rows = [p for p in rep.predictions if p["scaling"] == kept]
        if rows:
            out.append(f"### Predicted: {title}\n\n" + _prediction_table(rows))
    note = ("Predictions put each node on a machine of its own, with the reference's cores per rank, on the "
            "configured network; a measured node count (*as run*) has the model of that point as it ran, its host "
            "and cores, as the model-error table states it.")
    if any(not p["feasible"] for p in rep.predictions):
        note += (f" Strong scaling ends where the data-parallel ranks outnumber the global batch "
                 f"({ref.global_batch} sequences); the weak-scaling rows go on.")
    return "\n".join(out) + note + "\n"


def _prediction_table(rows: list[dict[str, Any]]) -> str:
    out = [("| nodes | ranks | global batch | predicted step (s) | compute (s) | comm (s) | predicted tokens/s | "
           "predicted efficiency | measured step p50 (s) | measured efficiency |"), "|" + "---|" * 10]
    for p in rows:
        if not p["feasible"]:
            out.append(f"| {p['nodes']} | {p['ranks']} | {p['global_batch']} | global batch < data-parallel ranks "
                       "| | | | | | |")
            continue
        nodes = f"{p['nodes']} (*as run*)" if p.get("as_run") else p["nodes"]
        out.append(f"| {nodes} | {p['ranks']} | {p['global_batch']} | {p['step_time_s']:.4g} | "
                   f"{p['compute_s']:.4g} | {p['comm_s']:.4g} | {p['tokens_per_s']:,.0f} | {pct(p['efficiency'])} | "
                   f"{fmt(p['measured_step_time_s'], '.4g')} | {pct(p['measured_efficiency'])} |")
    return "\n".join(out) + "\n\n"


PLOTS = (("throughput.png", "throughput vs nodes"), ("efficiency.png", "efficiency vs nodes"),
         ("step_time_per_rank.png", "per-rank step time per point"),
         ("prediction.png", "predicted step time vs nodes"))


def goodput(rep: Report) -> str:
    """Per point (and over the sweep): the share of the allocated time that trained steps it kept, and where
    the rest went (from each run folder's attempts.jsonl)."""
    runs = [(p.name, p.nodes, run_goodput(RunFolder(p.path).attempts.read())) for p in rep.points]
    runs = [(name, nodes, g) for name, nodes, g in runs if g.attempts]
    if not runs:
        return ""
    causes = list(runs[0][2].losses)
    lines = ["## Goodput\n", "Training time of the steps each run kept, over the time its attempts were allocated "
             "(attempts.jsonl); the rest, by cause. The sweep's row weighs each point by its nodes (node-seconds: "
             "what the allocations cost).\n",
             "| point | attempts | allocated | kept training | goodput | " + " | ".join(causes) + " |",
             "|---|---|---|---|---|" + "---|" * len(causes)]
    shown_runs, gap = shown([(name, g) for name, _, g in runs], "each run folder's `attempts.jsonl`")
    rendered = []
    for name, g in shown_runs:
        rendered.append(f"| {name} | {g.attempts} | {g.allocated_s:.1f} s | {g.kept_train_s:.1f} s | "
                        f"{pct(g.goodput)} | " + " | ".join(f"{g.losses[c]:.1f} s" for c in causes) + " |")
    lines += _collapse(rendered, gap)
    if len(runs) > 1:
        lines.append(sweep_goodput(runs, causes))
    return "\n".join(lines) + "\n"


def sweep_goodput(runs: list[tuple[str, int, RunGoodput]], causes: list[str]) -> str:
    """The sweep's goodput row in node-seconds: a second of a 4-node point costs four of a 1-node point's, so
    adding up wall seconds would weigh the small points as much as the large ones."""
    def node_s(of: Callable[[RunGoodput], float]) -> float:
        return sum(nodes * of(g) for _, nodes, g in runs)

    allocated, kept = node_s(lambda g: g.allocated_s), node_s(lambda g: g.kept_train_s)
    return (f"| **sweep** (node-seconds) | {sum(g.attempts for _, _, g in runs)} | {allocated:.1f} node-s | "
            f"{kept:.1f} node-s | {pct(kept / allocated if allocated else None)} | "
            + " | ".join(f"{node_s(lambda g, c=c: g.losses[c]):.1f} node-s" for c in causes) + " |")


def node_health(rep: Report) -> str:
    """The nodes each point ran on, as the health checks of its last attempt measured them, and the nodes its
    attempts excluded, by a health check, a hang, a lost node or a straggler (health-<attempt>.json,
    attempts.jsonl)."""
    lines = []
    for p in rep.points:
        found = RunFolder(p.path).health_records()
        excluded = ", ".join(excluded_hosts(RunFolder(p.path).attempts.read())) or "-"
        if not found:
            if excluded != "-":
                lines.append(f"| {p.name} | - | - | - | - | {excluded} |")
            continue
        h = json.loads(found[-1].read_text())
        speed, median = ("median_tflops", h["median_tflops"]) if "gpus" in h else ("gflops", h["median_gflops"])
        nodes = ", ".join(f"{n['host']} {n[speed]:.1f} ({n['fraction']:.2f})" for n in h["nodes"])
        lines.append(f"| {p.name} | {nodes} | {median:.1f} | {health_bus(h)} | {', '.join(h['flagged']) or '-'} | "
                     f"{excluded} |")
    if not lines:
        return ""
    return "\n".join(["## Nodes\n", "Each node's matmul speed before the last attempt (on CPU its ranks' GFLOP/s "
                      "together, and its share of the median node; on GPUs the median GPU's TFLOP/s, and its share "
                      "of the job's median GPU), the all-reduce bus bandwidth (on GPUs nccl-tests' busbw within "
                      "nodes / across nodes), the nodes below `health.min_fraction`, and the nodes earlier attempts "
                      "excluded: flagged by a health check, or left out of a requeue after a hang, a lost node or a "
                      "slow rank, or replaced by a spare (a point without health checks shows those alone).\n",
                      "| point | nodes: speed (share of median) | median | bus GB/s | flagged | excluded |",
                      "|---|---|---|---|---|---|", *_collapse(*shown(lines, "each run's `attempts.jsonl`"))]) + "\n"


def health_bus(record: dict) -> str:
    """The bus column: the CPU's preflight figure, or on GPUs the lowest intra-node and the inter-node busbw."""
    if "gpus" not in record:
        return f"{record['bus_gbps']:.2f}" if record.get("bus_gbps") else "-"
    bus = record["bus"] or {}
    intra, inter = list((bus.get("intra_gbps") or {}).values()), bus.get("inter_gbps")
    return (f"{min(intra):.1f}" if intra else "-") + " / " + (f"{inter:.1f}" if inter is not None else "-")


def plots(rep: Report) -> str:
    out = (["## Plots\n"] + [f"![{title}]({name})\n" for name, title in PLOTS]) if rep.scaling else []
    # paths relative to the report folder, as the plots' and traces' links are: the file is the same whichever
    # directory the report was built from, and wherever the folder is moved or copied
    folder = RunFolder(rep.root)
    board = folder.scaling_board.relative_to(rep.root).as_posix()
    up = os.path.relpath(rep.root, folder.report)
    out.append(f"TensorBoard: `tensorboard --logdir {up}` from this report's folder (or `--logdir {rep.root.name}` "
               f"from the folder holding `{rep.root.name}`): run `{board}` holds this report's plots (IMAGES) and "
               "tables (TEXT), and a dashboard (CUSTOM SCALARS).\n")
    return "\n".join(out)
