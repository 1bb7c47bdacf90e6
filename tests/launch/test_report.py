"""The scaling report: from real run folders, on synthetic sweeps (efficiency, stragglers), and its performance model."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from conftest import launch, read_metrics
from launch.perf_model import Network, Shape, comm_volume, fit, nominal_comm_time, scaled_shape
from launch.report import ReportConfig, build_report, main, write_report

OUTPUTS = ("scaling.csv", "scaling.md", "prediction.csv", "model.json", "throughput.png", "efficiency.png",
           "step_time_per_rank.png", "prediction.png")
TINY = ["model=tiny", "strategy=ddp", "train.max_steps=20", "train.log_interval=5", "train.eval_interval=0",
        "train.layer_grad_norms=false", "checkpoint.interval_steps=0"]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# --- real run folders: a two-point sweep, nodes=1 and nodes=2 ------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_overrides):
    """A real `-m nodes=1,2` sweep on this machine; the launcher writes the report when it ends."""
    root = tmp_path_factory.mktemp("sweep")
    proc = launch("nodes=1,2", *TINY, *data_overrides, run_dir=root, multirun=True)
    assert f"scaling report: {root / 'report'}" in proc.stdout
    return root


@pytest.mark.slow
def test_report_rows_match_the_metrics_files(sweep):
    rows = csv_rows(sweep / "report" / "scaling.csv")
    assert [(r["point"], r["nodes"], r["ranks"], r["global_batch"]) for r in rows] == [
        ("nodes=1", "1", "1", "12"), ("nodes=2", "2", "2", "12")]
    per_rank_tokens = []
    for row in rows:
        run, ranks = sweep / row["point"], int(row["ranks"])
        recs = [r for rank in range(ranks) for r in read_metrics(run, rank)[1:]]  # the first window is warm-up
        assert len(recs) == 3 * ranks and int(row["windows"]) == 3
        times = [r["step_time_s"] for r in recs]
        assert float(row["step_time_p50_s"]) == pytest.approx(np.percentile(times, 50))
        assert float(row["step_time_p90_s"]) == pytest.approx(np.percentile(times, 90))
        assert float(row["step_time_max_s"]) == pytest.approx(max(times))
        tokens = float(np.median([r["tokens_per_s"] for r in recs]))
        assert float(row["tokens_per_s"]) == pytest.approx(tokens)
        assert float(row["tokens_per_s_rank"]) == pytest.approx(tokens / ranks)
        assert row["mfu"] == "" and row["stragglers"] == "0"  # no MFU on a CPU: no peak is known
        comm = float(np.median([r["comm_s"] / r["step_time_s"] for r in recs]))
        assert float(row["comm_fraction"]) == pytest.approx(comm)
        assert (comm == 0) == (ranks == 1)  # one rank never waits for another
        per_rank_tokens.append(tokens / ranks)
    assert float(rows[0]["efficiency"]) == 1.0
    assert float(rows[1]["efficiency"]) == pytest.approx(per_rank_tokens[1] / per_rank_tokens[0])
    md = (sweep / "report" / "scaling.md").read_text()
    assert "**strong scaling**" in md and "| nodes=2 | 2 | 2 | ddp | 12 | 6 |" in md


@pytest.mark.slow
def test_report_files_exist(sweep):
    for name in OUTPUTS:
        path = sweep / "report" / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = json.loads((sweep / "report" / "model.json").read_text())
    assert model["mode"] == "strong" and model["network"]["inter_node_GBps"] == 50.0
    nodes = [int(r["nodes"]) for r in csv_rows(sweep / "report" / "prediction.csv")]
    assert nodes == [1, 2, 8, 16, 32, 64, 128, 256, 512, 1024]


@pytest.mark.slow
def test_tensorboard_scaling_run_holds_the_scalars_and_the_custom_scalars_layout(sweep):
    events = EventAccumulator(str(sweep / "tensorboard" / "scaling"), size_guidance={"tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"scaling/tokens_per_s", "scaling/tokens_per_s_ideal", "scaling/efficiency", "scaling/step_time_p50_s",
            "scaling/step_time_p90_s", "model/step_time_s", "model/efficiency"} <= scalars
    assert [(e.step, round(e.value, 3)) for e in events.Scalars("scaling/efficiency")][0] == (1, 1.0)
    assert [e.step for e in events.Scalars("scaling/tokens_per_s")] == [1, 2]
    assert "custom_scalars__config__" in events.PluginTagToContent("custom_scalars")
    proto = events.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    charts = {ch.title: ch for c in layout.category for ch in c.chart}
    assert [c.title for c in layout.category] == ["scaling", "stragglers during training"]
    throughput = next(ch for t, ch in charts.items() if t.startswith("throughput vs nodes"))
    assert list(throughput.multiline.tag) == [r"^scaling/tokens_per_s$", r"^scaling/tokens_per_s_ideal$",
                                              r"^model/tokens_per_s$"]
    margin = next(ch for t, ch in charts.items() if t.startswith("step time p50"))
    assert margin.margin.series[0].upper == "scaling/step_time_p90_s"
    # every tag the scaling category names is one the run holds
    for chart in layout.category[0].chart:
        for pattern in chart.multiline.tag:
            assert any(re.search(pattern, t) for t in scalars) or "mfu" in pattern or "comm" in pattern, pattern
    assert "scaling/report/text_summary" in events.Tags()["tensors"]


@pytest.mark.slow
def test_offline_report_equals_the_one_written_at_the_end_of_the_sweep(sweep, capsys):
    before = {n: (sweep / "report" / n).read_bytes() for n in OUTPUTS if not n.endswith(".png")}
    assert main([str(sweep)]) == 0
    assert "# Scaling report" in capsys.readouterr().out
    after = {n: (sweep / "report" / n).read_bytes() for n in before}
    assert after == before
    assert len(list((sweep / "tensorboard" / "scaling").iterdir())) == 1  # replaced, not appended to
    # a single run folder is a report of one point
    out = write_report(sweep / "nodes=2")
    assert [r["point"] for r in csv_rows(out / "scaling.csv")] == ["nodes=2"]
    assert (sweep / "nodes=2" / "tensorboard" / "scaling").is_dir()


def test_a_folder_without_runs_is_a_user_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no run folder" in capsys.readouterr().err


# --- synthetic sweeps ---------------------------------------------------------------------------------
def write_point(folder: Path, nodes: int, tasks: int, global_batch: int, step_times, comm=None, hosts=None,
                strategy: str = "ddp", block: int = 64) -> None:
    """A run folder as the trainer writes it; step_times[rank][window] (or one list for every rank)."""
    ranks = nodes * tasks
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        f"model:\n  name: tiny\n  n_layer: 2\n  n_head: 2\n  n_embd: 64\n  block_size: {block}\n  vocab_size: 65\n"
        f"train:\n  global_batch_size: {global_batch}\n  precision: fp32\n"
        f"strategy:\n  name: {strategy}\n  bucket_cap_mb: 25\ncluster:\n  name: local\n  nodes: {nodes}\n"
        f"  tasks_per_node: {tasks}\nnodes: {nodes}\n")
    (folder / "metrics").mkdir()
    (folder / "environment").mkdir()
    for r in range(ranks):
        host = hosts[r] if hosts else f"node{r // tasks}"
        (folder / "environment" / f"rank{r}.json").write_text(json.dumps(
            {"rank": r, "world_size": ranks, "num_nodes": nodes, "host": host}))
        times = step_times[r] if isinstance(step_times[0], list) else step_times
        lines = []
        for w, t in enumerate(times):
            rec = {"kind": "train", "step": 5 * w + 4, "rank": r, "host": host, "step_time_s": t,
                   "tokens_per_s": global_batch * block / t, "mfu": None}
            if comm is not None:
                rec["comm_s"] = comm[r][w] if isinstance(comm[r], list) else comm[r]
            lines.append(json.dumps(rec))
        lines.append(json.dumps({"kind": "val", "step": 99, "rank": r, "loss": 1.0}))
        (folder / "metrics" / f"rank{r}.jsonl").write_text("\n".join(lines) + "\n")


def test_weak_scaling_efficiency(tmp_path):
    for nodes, t in ((1, 1.0), (2, 1.25), (4, 1.6)):
        write_point(tmp_path / f"nodes={nodes}", nodes, 1, 8 * nodes, [9.0, t, t, t])  # 8 sequences per rank
    rep = build_report(tmp_path)
    assert rep.mode == "weak"
    assert [r.efficiency for r in rep.rows] == pytest.approx([1.0, 0.8, 0.625])
    assert [r.step_time_p50_s for r in rep.rows] == pytest.approx([1.0, 1.25, 1.6])  # the 9 s window is skipped


def test_strong_scaling_efficiency_and_mixed(tmp_path):
    for nodes, t in ((1, 1.0), (2, 0.625), (4, 0.5)):
        write_point(tmp_path / "strong" / f"nodes={nodes}", nodes, 1, 16, [t, t, t])
    rep = build_report(tmp_path / "strong", ReportConfig(skip_windows=0))
    assert rep.mode == "strong"
    assert [r.efficiency for r in rep.rows] == pytest.approx([1.0, 0.8, 0.5])  # t0 r0 / (t r)
    assert [p["feasible"] for p in rep.predictions if p["nodes"] >= 8] == [True, True, False, False, False, False,
                                                                            False, False]
    write_point(tmp_path / "mixed" / "a", 1, 1, 8, [1.0])
    write_point(tmp_path / "mixed" / "b", 2, 1, 12, [1.0])
    mixed = build_report(tmp_path / "mixed", ReportConfig(skip_windows=0))
    assert mixed.mode == "mixed" and mixed.rows[1].efficiency == pytest.approx(0.75)


def test_report_names_a_chronic_straggler_and_its_host(tmp_path):
    # 4 ranks in sync: equal step times; rank 3 waits least in the all-reduce, so it is the slow one.
    comm = [[0.3] * 5, [0.3] * 5, [0.31] * 5, [0.3, 0.3, 0.02, 0.02, 0.02]]
    write_point(tmp_path / "nodes=2", 2, 2, 16, [1.0] * 5, comm=comm, hosts=["a", "a", "b", "b"])
    rep = build_report(tmp_path)
    row = rep.rows[0]
    assert (row.stragglers, row.straggler_ranks) == (1, "3@b")
    assert row.comm_fraction == pytest.approx(0.3)
    assert row.comm_s == pytest.approx(0.3) and row.fwd_bwd_s is None
    md = (write_report(tmp_path) / "scaling.md").read_text()
    assert "straggler: rank 3 on b" in md and "comm 0.3" in md


def test_report_of_many_ranks(tmp_path):
    write_point(tmp_path / "nodes=10", 10, 8, 160, [0.5, 0.5])  # 80 ranks: a histogram instead of 80 boxes
    out = write_report(tmp_path)
    assert (out / "step_time_per_rank.png").stat().st_size > 0
    assert [r["ranks"] for r in csv_rows(out / "scaling.csv")] == ["80"]


# --- the performance model ---------------------------------------------------------------------------
def shape(nodes: int, tasks: int = 8, batch: int = 512, strategy: str = "ddp", **cfg) -> Shape:
    return Shape(nodes=nodes, tasks_per_node=tasks, global_batch=batch, block_size=1024, n_embd=768, n_layer=12,
                 params=124_000_000, strategy=strategy, strategy_cfg=cfg)


def test_collective_volumes_per_strategy():
    s = shape(2)  # 16 ranks
    p = 4 * 124e6
    assert comm_volume(s).bus_bytes == pytest.approx(2 * 15 / 16 * p)
    assert comm_volume(shape(2, strategy="fsdp")).bus_bytes == pytest.approx(3 * 15 / 16 * p)
    assert comm_volume(shape(2, strategy="fsdp", reshard_after_forward=False)).bus_bytes == pytest.approx(
        2 * 15 / 16 * p)
    assert comm_volume(shape(2, strategy="deepspeed", stage=3)).bus_bytes == pytest.approx(3 * 15 / 16 * p)
    pipe = comm_volume(shape(2, strategy="pipeline", pp=2, microbatches=4))
    assert pipe.bus_bytes == pytest.approx(2 * 7 / 8 * p / 2) and pipe.p2p_bytes > 0
    assert comm_volume(shape(1, tasks=1)).bus_bytes == 0
    # one node: NVLink; more: InfiniBand, 18x slower per byte
    net = Network(intra_node_latency_us=0, inter_node_latency_us=0)
    assert nominal_comm_time(shape(2), net) / nominal_comm_time(shape(1, tasks=16), net) == pytest.approx(18)


@pytest.mark.parametrize("mode", ["weak", "strong"])
def test_the_fit_recovers_its_parameters(mode):
    net = Network()
    c, k = 0.004, 0.7
    shapes = [scaled_shape(shape(1, batch=256), n, mode) for n in (1, 2, 4, 8)]
    truth = [c * s.sequences_per_rank + k * nominal_comm_time(s, net) for s in shapes]
    model = fit(shapes, truth, net)
    assert (model.compute_s_per_sequence, model.comm_scale) == pytest.approx((c, k), rel=1e-6)
    assert model.residual_rms_s < 1e-9 and model.method == "c and k by least squares"
    noisy = fit(shapes, [t * f for t, f in zip(truth, (1.01, 0.99, 1.0, 1.02))], net)
    assert noisy.compute_s_per_sequence == pytest.approx(c, rel=0.05) and noisy.comm_scale == pytest.approx(k, rel=0.2)
    if mode == "weak":
        effs = [model.efficiency(scaled_shape(shapes[0], n, mode), shapes[0]) for n in (8, 64, 1024)]
        assert 1.0 > effs[0] > effs[1] > effs[2] > 0


def test_the_fit_with_one_point_or_measured_communication():
    net = Network()
    one = fit([shape(1)], [0.5], net)
    assert one.comm_scale == 1.0 and one.step_time(shape(1)) == pytest.approx(0.5)
    shapes = [shape(n) for n in (1, 2, 4)]
    comm = [2.0 * nominal_comm_time(s, net) for s in shapes]
    model = fit(shapes, [0.001 * s.sequences_per_rank + x for s, x in zip(shapes, comm)], net, comm)
    assert model.comm_scale == pytest.approx(2.0) and model.compute_s_per_sequence == pytest.approx(0.001)
    assert "measured communication" in model.method
    with pytest.raises(ValueError):
        Network.from_cfg({"nvlink": 1})
