"""The scaling report of a run folder or a sweep folder, rebuilt from the files in the run folders alone.

    python -m launch.report RUN_OR_SWEEP_DIR

A point is a run folder: `config.yaml` next to `metrics/rank<R>.jsonl` (and `environment/rank<R>.json`). A sweep
folder holds one per point (`nodes=1/`, `nodes=2/`, ...). The report goes to `DIR/report/` (scaling.csv,
scaling.md, prediction.csv, model.json, PNG plots) and `DIR/tensorboard/scaling/` (a TensorBoard run with the
scaling dashboard as a custom-scalars layout), so `tensorboard --logdir DIR` shows it next to the training curves.
The sweep launcher calls `write_report(sweep_dir)` when a sweep finishes; the offline command runs the same
function on the same files, so both give the same report.

Conventions
- Steady state: each rank's first `skip_windows` log windows (start-up, warm-up, compilation) are left out when
  more windows remain. p50/p90 are over every (rank, window) step time that is left.
- tokens/s is the global figure each rank logs (the median over ranks and windows); per rank = total / ranks.
- Efficiency is per-rank throughput against the smallest point. With the per-rank batch fixed (weak scaling)
  that is t_ref / t; with the global batch fixed (strong scaling) it is (t_ref x ranks_ref) / (t x ranks):
  speed-up over ideal speed-up. Both are the same ratio of tokens/s per rank; the report says which applies.
- Stragglers: the rule of gpt.stragglers replayed on the per-rank records (same thresholds as in training).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from gpt.stragglers import StragglerConfig, StragglerDetector
from launch.perf_model import FittedModel, Network, Shape, fit, nominal_comm_time, scaled_shape

log = logging.getLogger(__name__)

REPORT_DIR = "report"
TB_RUN = Path("tensorboard") / "scaling"
PREDICT_NODES = (8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class ReportConfig:
    """The proposed `report:` config block (read from the smallest point's config.yaml when present)."""

    skip_windows: int = 1
    predict_nodes: tuple[int, ...] = PREDICT_NODES
    network: Network = field(default_factory=Network)

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any] | None) -> "ReportConfig":
        cfg = dict(cfg or {})
        out = cls()
        if cfg.get("skip_windows") is not None:
            out = cls(int(cfg["skip_windows"]), out.predict_nodes, out.network)
        if cfg.get("predict_nodes"):
            out = cls(out.skip_windows, tuple(int(n) for n in cfg["predict_nodes"]), out.network)
        if cfg.get("network"):
            out = cls(out.skip_windows, out.predict_nodes, Network.from_cfg(cfg["network"]))
        return out


# --- reading run folders -----------------------------------------------------------------------------
@dataclass
class Point:
    path: Path
    name: str
    config: dict[str, Any]
    environments: list[dict[str, Any]]
    records: dict[int, list[dict[str, Any]]]  # rank -> train records, in step order

    @property
    def ranks(self) -> int:
        if self.environments:
            return int(self.environments[0].get("world_size") or len(self.records))
        return len(self.records)

    @property
    def nodes(self) -> int:
        n = _get(self.config, "cluster.nodes") or _get(self.config, "nodes")
        if n is None and self.environments:
            n = self.environments[0].get("num_nodes")
        return int(n or 1)

    @property
    def hosts(self) -> list[str]:
        by_rank = {int(e["rank"]): str(e.get("host", "?")) for e in self.environments if "rank" in e}
        for rank, recs in self.records.items():
            if rank not in by_rank and recs:
                by_rank[rank] = str(recs[0].get("host", "?"))
        return [by_rank.get(r, "?") for r in range(self.ranks)]


def _get(d: dict[str, Any], dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _load_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # already resolved when written


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics").is_dir()


def find_run_folders(root: Path, max_depth: int = 4) -> list[Path]:
    """The run folders at or under root (a run folder's own subfolders are not searched)."""
    if is_run_folder(root):
        return [root]
    found: list[Path] = []
    if max_depth == 0:
        return found
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if child.name in (REPORT_DIR, "tensorboard", ".hydra", "checkpoints", "logs") or child.name.startswith("."):
            continue
        found.extend(find_run_folders(child, max_depth - 1))
    return found


def load_point(path: Path, root: Path) -> Point:
    config = _load_yaml(path / "config.yaml")
    envs = []
    for f in sorted((path / "environment").glob("rank*.json")):
        try:
            envs.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping %s: %s", f, e)
    envs.sort(key=lambda e: int(e.get("rank", 0)))
    records: dict[int, list[dict[str, Any]]] = {}
    for f in sorted((path / "metrics").glob("rank*.jsonl")):
        rank = int(f.stem.removeprefix("rank"))
        recs = []
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed job
            if r.get("kind") == "train" and r.get("step_time_s") is not None:
                recs.append(r)
        # A requeued job appends to the same file: keep the newest record of each step.
        by_step = {r["step"]: r for r in recs}
        records[rank] = [by_step[s] for s in sorted(by_step)]
    name = str(path.relative_to(root)) if path != root else path.name
    return Point(path, name, config, envs, records)


# --- one row per point -------------------------------------------------------------------------------
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
    comm_s: float | None = None
    efficiency: float = math.nan
    predicted_step_time_s: float = math.nan
    predicted_efficiency: float = math.nan


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


def _finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def replay_stragglers(point: Point, config: StragglerConfig, skip: int) -> tuple[list[int], list[Any]]:
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


def shape_of(point: Point) -> Shape:
    cfg = point.config
    return Shape(
        nodes=point.nodes,
        tasks_per_node=max(point.ranks // point.nodes, 1),
        global_batch=int(_get(cfg, "train.global_batch_size", 1)),
        block_size=int(_get(cfg, "model.block_size", 1)),
        n_embd=int(_get(cfg, "model.n_embd", 1)),
        n_layer=int(_get(cfg, "model.n_layer", 1)),
        params=parameter_count(point),
        strategy=str(_get(cfg, "strategy.name", "single")),
        precision=str(_get(cfg, "train.precision", "fp32")),
        strategy_cfg=dict(_get(cfg, "strategy", {}) or {}),
    )


def parameter_count(point: Point) -> int:
    """Model parameters: logged, else counted from the model config, else estimated from the bytes rank 0 holds."""
    first = next((recs[0] for recs in point.records.values() if recs), {})
    if first.get("model_params"):
        return int(first["model_params"])
    try:
        from gpt.config import ModelConfig
        from gpt.flops import param_count

        model = dict(_get(point.config, "model", {}))
        if model.get("vocab_size") is None:
            from gpt.data import read_meta

            model["vocab_size"] = _get(point.config, "data.vocab_size") or read_meta(_get(point.config, "data.dir"))[
                "vocab_size"]
        return int(param_count(ModelConfig.from_dict(model))["total"])
    except Exception as e:  # noqa: BLE001 - a report must survive a moved data folder
        log.info("%s: counting parameters from the config failed (%s); estimating from param_bytes", point.name, e)
    held = first.get("param_bytes") or 0
    sharded = _get(point.config, "strategy.name") == "fsdp" or (
        _get(point.config, "strategy.name") == "deepspeed" and _get(point.config, "strategy.stage") == 3)
    return int(held / 4 * (point.ranks if sharded else 1))


# Per-step figures the trainer records each window (gpt.stragglers.FIGURES); any of them may be absent.
BREAKDOWN = ("data_time_s", "fwd_bwd_s", "optimizer_s", "comm_s")


def summarize(point: Point, skip: int, stragglers: StragglerConfig) -> Row:
    pairs = [r for rank in sorted(point.records) for r in steady(point.records[rank], skip)]
    if not pairs:
        raise ValueError(f"{point.path}: no train records in metrics/rank*.jsonl")
    step_times = _finite(r.get("step_time_s") for r in pairs)
    tokens = _finite(r.get("tokens_per_s") for r in pairs)
    mfus = _finite(r.get("mfu") for r in pairs)
    comm = _finite(r["comm_s"] / r["step_time_s"] for r in pairs
                   if isinstance(r.get("comm_s"), (int, float)) and r.get("step_time_s"))
    flagged, _ = replay_stragglers(point, stragglers, skip)
    hosts = point.hosts
    breakdown = {}
    for key in BREAKDOWN:
        values = _finite(r.get(key) for r in pairs)
        breakdown[key] = statistics.median(values) if values else None
    shape = shape_of(point)
    total = statistics.median(tokens) if tokens else math.nan
    return Row(
        point=point.name, nodes=point.nodes, ranks=point.ranks, tasks_per_node=shape.tasks_per_node,
        strategy=shape.strategy, global_batch=shape.global_batch, batch_per_rank=shape.global_batch / shape.dp,
        tokens_per_step=shape.global_batch * shape.block_size, tokens_per_s=total,
        tokens_per_s_rank=total / point.ranks,
        mfu=statistics.median(mfus) if mfus else None,
        step_time_p50_s=percentile(step_times, 50), step_time_p90_s=percentile(step_times, 90),
        step_time_min_s=min(step_times), step_time_max_s=max(step_times),
        comm_fraction=statistics.median(comm) if comm else None,
        stragglers=len(flagged), straggler_ranks="; ".join(f"{r}@{hosts[r]}" for r in flagged),
        windows=len(pairs) // max(len(point.records), 1), **breakdown,
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
    return ref


# --- the whole report --------------------------------------------------------------------------------
@dataclass
class Report:
    root: Path
    rows: list[Row]
    mode: str
    reference: Row
    model: FittedModel
    predictions: list[dict[str, Any]]
    points: list[Point]
    shapes: list[Shape]
    config: ReportConfig
    straggler_config: StragglerConfig


def build_report(root: Path, config: ReportConfig | None = None) -> Report:
    root = Path(root)
    folders = find_run_folders(root)
    if not folders:
        raise FileNotFoundError(f"{root}: no run folder (config.yaml next to metrics/) at or under it")
    points = [load_point(f, root) for f in folders]
    points = [p for p in points if any(p.records.values())]
    if not points:
        raise FileNotFoundError(f"{root}: the run folders hold no train records yet")
    points.sort(key=lambda p: (p.ranks, p.nodes, p.name))
    first = points[0].config
    config = config or ReportConfig.from_cfg(_get(first, "report"))
    straggler_config = StragglerConfig.from_metrics_cfg(_get(first, "metrics"))
    rows = [summarize(p, config.skip_windows, straggler_config) for p in points]
    mode = scaling_mode(rows)
    reference = add_efficiency(rows)
    shapes = [shape_of(p) for p in points]
    comm_s = []
    for p in points:
        values = _finite(r.get("comm_s") for rank in sorted(p.records) for r in steady(p.records[rank],
                                                                                        config.skip_windows))
        comm_s.append(statistics.median(values) if values else None)
    model = fit(shapes, [r.step_time_p50_s for r in rows], config.network, comm_s)
    ref_shape = shapes[rows.index(reference)]
    for row, shape in zip(rows, shapes):
        row.predicted_step_time_s = model.step_time(shape)
        row.predicted_efficiency = model.efficiency(shape, ref_shape)
    predictions = predict(model, ref_shape, mode, config.predict_nodes, rows)
    return Report(root, rows, mode, reference, model, predictions, points, shapes, config, straggler_config)


def predict(model: FittedModel, ref: Shape, mode: str, nodes: Iterable[int], rows: Sequence[Row]
            ) -> list[dict[str, Any]]:
    kept = "strong" if mode == "strong" else "weak"
    measured = {r.nodes: r for r in rows if r.tasks_per_node == ref.tasks_per_node}
    out = []
    for n in sorted(set(nodes) | set(measured)):
        s = scaled_shape(ref, n, kept)
        row = measured.get(n)
        entry: dict[str, Any] = {"nodes": n, "ranks": s.ranks, "global_batch": s.global_batch,
                                 "feasible": s.feasible}
        if s.feasible:
            comm = model.comm_scale * nominal_comm_time(s, model.network)
            entry.update(step_time_s=model.step_time(s), compute_s=model.step_time(s) - comm, comm_s=comm,
                         tokens_per_s=model.tokens_per_s(s), efficiency=model.efficiency(s, ref))
        else:
            entry.update(step_time_s=math.nan, compute_s=math.nan, comm_s=math.nan, tokens_per_s=math.nan,
                         efficiency=math.nan)
        entry["measured_step_time_s"] = row.step_time_p50_s if row else None
        entry["measured_efficiency"] = row.efficiency if row else None
        out.append(entry)
    return out


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _pct(v: float | None) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}%"


MODE_TEXT = {
    "weak": "**weak scaling**: the per-rank batch is fixed, so efficiency = t(ref) / t(n)",
    "strong": "**strong scaling**: the global batch is fixed, so efficiency = t(ref) x ranks(ref) / (t(n) x ranks(n))",
    "single point": "a single point: no scaling to measure; efficiency is 1 by definition",
    "mixed": "**mixed**: neither the global nor the per-rank batch is fixed across points; efficiency is tokens/s "
             "per rank against the smallest point",
}


def markdown(rep: Report) -> str:
    rows, m = rep.rows, rep.model
    out = io.StringIO()
    w = out.write
    w(f"# Scaling report: {rep.root.name}\n\n")
    w(f"{len(rows)} point(s); {MODE_TEXT[rep.mode]}. Reference: `{rep.reference.point}` "
      f"({rep.reference.nodes} node(s), {rep.reference.ranks} rank(s)). Steady state: the first "
      f"{rep.config.skip_windows} log window(s) of each rank are left out.\n\n")
    w("| point | nodes | ranks | strategy | global batch | batch/rank | tokens/s | tokens/s/rank | MFU | "
      "step p50 (s) | step p90 (s) | comm | stragglers | efficiency | model step (s) |\n")
    w("|" + "---|" * 15 + "\n")
    for r in rows:
        w(f"| {r.point} | {r.nodes} | {r.ranks} | {r.strategy} | {r.global_batch} | {r.batch_per_rank:g} | "
          f"{r.tokens_per_s:,.0f} | {r.tokens_per_s_rank:,.0f} | {_pct(r.mfu)} | {r.step_time_p50_s:.4g} | "
          f"{r.step_time_p90_s:.4g} | {_pct(r.comm_fraction)} | {r.stragglers or 'none'}"
          f"{' (' + r.straggler_ranks + ')' if r.stragglers else ''} | {_pct(r.efficiency)} | "
          f"{r.predicted_step_time_s:.4g} |\n")
    w("\nStep-time breakdown (medians, s): " + "; ".join(
        f"`{r.point}` " + ", ".join(f"{k.removesuffix('_s').replace('_time', '')} {_fmt(getattr(r, k), '.3g')}"
                                   for k in BREAKDOWN) for r in rows) + ".\n")
    w("\nMFU is n/a where no peak FLOP/s is known (CPU, unknown GPU). comm is the median fraction of the step "
      "spent in collectives, n/a where the run did not record `comm_s`.\n\n")
    w("## Stragglers\n\n")
    sc = rep.straggler_config
    w(f"Rule: a rank whose busy time (step time minus time in collectives, when recorded) is more than "
      f"{sc.threshold_pct:g}% above the median rank for {sc.windows} consecutive log windows.\n\n")
    any_events = False
    for p in rep.points:
        _, events = replay_stragglers(p, sc, rep.config.skip_windows)
        for e in events:
            any_events = True
            w(f"- `{p.name}`: {e.message()}\n")
    if not any_events:
        w("No rank was a straggler at any point.\n")
    w("\n## Performance model\n\n")
    w("step_time(n) = c x sequences_per_rank(n) + k x comm(n), comm = latency + bytes / bandwidth for the "
      "strategy's collectives (see `launch/perf_model.py`).\n\n")
    net = m.network
    w(f"- c = {m.compute_s_per_sequence:.4g} s per sequence per rank; k = {m.comm_scale:.3g} "
      f"(1 = communication as fast as the configured network; {m.method}); "
      f"rms residual {m.residual_rms_s:.3g} s\n")
    w(f"- network (`report.network.*`): intra-node {net.intra_node_GBps:g} GB/s, {net.intra_node_latency_us:g} us; "
      f"inter-node {net.inter_node_GBps:g} GB/s, {net.inter_node_latency_us:g} us\n")
    if rep.mode == "mixed":
        w("- predictions keep the reference's per-rank batch (weak scaling)\n")
    if rep.mode == "strong" and not all(p["feasible"] for p in rep.predictions):
        w(f"- strong scaling ends where the data-parallel ranks outnumber the global batch "
          f"({rep.reference.global_batch} sequences)\n")
    w("\n| nodes | ranks | global batch | predicted step (s) | compute (s) | comm (s) | predicted tokens/s | "
      "predicted efficiency | measured step p50 (s) | measured efficiency |\n")
    w("|" + "---|" * 10 + "\n")
    for p in rep.predictions:
        if not p["feasible"]:
            w(f"| {p['nodes']} | {p['ranks']} | {p['global_batch']} | global batch < data-parallel ranks | "
              f"| | | | | |\n")
            continue
        w(f"| {p['nodes']} | {p['ranks']} | {p['global_batch']} | {p['step_time_s']:.4g} | {p['compute_s']:.4g} | "
          f"{p['comm_s']:.4g} | {p['tokens_per_s']:,.0f} | {_pct(p['efficiency'])} | "
          f"{_fmt(p['measured_step_time_s'], '.4g')} | {_pct(p['measured_efficiency'])} |\n")
    w("\n## Plots\n\n")
    for name, title in PLOTS:
        w(f"![{title}]({name})\n\n")
    w(f"TensorBoard: `tensorboard --logdir {rep.root}` (CUSTOM SCALARS tab: the scaling dashboard; run "
      f"`{TB_RUN.as_posix()}`).\n")
    return out.getvalue()


PLOTS = (("throughput.png", "throughput vs nodes"), ("efficiency.png", "efficiency vs nodes"),
         ("step_time_per_rank.png", "per-rank step time per point"),
         ("prediction.png", "predicted step time vs nodes"))

CSV_FIELDS = [f for f in Row.__dataclass_fields__]


def _csv(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()


def write_report(run_or_sweep_dir: str | Path, config: ReportConfig | None = None) -> Path:
    """Write the report of a run or sweep folder; returns the report folder. Same files offline or at sweep end."""
    from launch import report_outputs

    rep = build_report(Path(run_or_sweep_dir), config)
    out = rep.root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.csv").write_text(_csv([asdict(r) for r in rep.rows], CSV_FIELDS))
    (out / "prediction.csv").write_text(_csv(rep.predictions, list(rep.predictions[0])))
    (out / "model.json").write_text(json.dumps({"mode": rep.mode, "reference": rep.reference.point,
                                                **rep.model.as_dict()}, indent=1) + "\n")
    (out / "scaling.md").write_text(markdown(rep))
    report_outputs.plots(rep, out)
    report_outputs.tensorboard_run(rep, rep.root / TB_RUN, markdown(rep))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.report",
                                     description="Scaling report of a run folder or a sweep folder.")
    parser.add_argument("dir", type=Path, help="a run folder (config.yaml, metrics/) or a sweep folder of them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a folder", file=sys.stderr)
        return 2
    try:
        out = write_report(args.dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "scaling.md").read_text())
    print(f"report: {out}\ntensorboard --logdir {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
