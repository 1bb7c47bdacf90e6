"""A sweep over other keys than the node count is compared on what the user swept for: points ranked by
validation loss, loss curves overlaid in one plot, tokens/s, and no scaling columns; both when both vary."""
from __future__ import annotations

import re

import pytest
from helpers import launch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from test_report import TINY, csv_rows, write_point

from launch.report import build_report, outputs, write_report

SCALING_ONLY = ("scaling.csv", "prediction.csv", "model.json", "throughput.png", "efficiency.png",
                "step_time_per_rank.png", "prediction.png")
SCALING_WORDS = re.compile(r"efficiency|strong scaling|weak scaling|model step|predicted|straggler", re.IGNORECASE)


def layout_of(root):
    events = EventAccumulator(str(root / "tensorboard" / "scaling"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    proto = events.Tensors("custom_scalars__config__")[0].tensor_proto
    return events, layout_pb2.Layout.FromString(proto.string_val[0])


def write_lr_sweep(root, nodes: int = 1, finals=(2.0, 1.6, 1.8), lrs=(1e-3, 3e-4, 1e-4)) -> None:
    for lr, final in zip(lrs, finals):
        write_point(root / f"nodes={nodes},train.lr={lr}", nodes, 1, 12, [0.1] * 4, lr=lr, hosts=["a", "b"][:nodes],
                    losses=[3.0, 2.6, 2.3, final + 0.1], val=((10, 2.5), (20, final - 0.05), (30, final)))


def test_an_lr_sweep_ranks_its_points_by_validation_loss_with_no_scaling_columns(tmp_path):
    write_lr_sweep(tmp_path)
    rep = build_report(tmp_path)
    assert (rep.keys, rep.scaling) == (["train.lr"], False)
    assert [(r.rank, r.label, r.best_val_loss, r.final_val_loss) for r in rep.compare] == [
        (1, "train.lr=0.0003", 1.55, 1.6), (2, "train.lr=0.0001", 1.75, 1.8), (3, "train.lr=0.001", 1.95, 2.0)]
    out = write_report(tmp_path)
    md = (out / "scaling.md").read_text()
    assert md.startswith("# Sweep report: ") and "they differ in `train.lr`" in md
    assert "| 1 | train.lr=0.0003 | 1.5500 (20) | 1.6000 | 1.7000 | 7,680 | 30 |" in md
    assert "![training and validation loss per point](loss_curves.png)" in md
    assert not SCALING_WORDS.search(md), SCALING_WORDS.search(md)
    assert not any((out / name).exists() for name in SCALING_ONLY)
    assert [r["label"] for r in csv_rows(out / "comparison.csv")] == [r.label for r in rep.compare]
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    events, layout = layout_of(tmp_path)
    assert events.Tags()["images"] == ["report/loss_curves"] and events.Tags()["scalars"] == []
    assert [c.title.split(" (")[0] for c in layout.category] == ["comparison: train.lr"]  # 1 rank: no stragglers
    summary = events.Tensors("report/1_summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| 1 | train.lr=0.0003 |" in summary
    assert "![" not in summary and "(plot: training and validation loss per point, IMAGES tab, report/loss_curves)" in summary


def test_without_validation_the_points_are_ranked_by_training_loss(tmp_path):
    for lr, final in ((1e-3, 2.0), (1e-4, 2.5)):
        write_point(tmp_path / f"train.lr={lr}", 1, 1, 12, [0.1] * 3, lr=lr, val=(), losses=[3.0, 2.8, final])
    rep = build_report(tmp_path)
    assert [(r.rank, r.label) for r in rep.compare] == [(1, "train.lr=0.001"), (2, "train.lr=0.0001")]
    md = (write_report(tmp_path) / "scaling.md").read_text()
    assert "Ranked by final training loss (no point recorded a validation loss)" in md
    _, layout = layout_of(tmp_path)
    assert not any(ch.title.startswith("validation loss") for c in layout.category for ch in c.chart)


@pytest.mark.slow
def test_when_nodes_and_another_key_vary_the_report_gives_both(tmp_path):
    write_lr_sweep(tmp_path, nodes=1, lrs=(1e-3, 1e-4), finals=(2.0, 2.2))
    write_lr_sweep(tmp_path, nodes=2, lrs=(1e-3, 1e-4), finals=(2.01, 2.21))
    rep = build_report(tmp_path)
    assert rep.keys == ["nodes", "train.lr"] and rep.compared_keys == ["train.lr"]
    assert rep.scaling and [r.label for r in rep.compare][:2] == ["nodes=1, train.lr=0.001", "nodes=2, train.lr=0.001"]
    out = write_report(tmp_path)
    md = (out / "scaling.md").read_text()
    assert "## Comparison: train.lr" in md and "## Measured" in md and "### Model error" in md
    assert all((out / name).exists() for name in (*SCALING_ONLY, "comparison.csv", "loss_curves.png"))
    _, layout = layout_of(tmp_path)
    assert [c.title.split(" (")[0] for c in layout.category] == [
        "comparison: train.lr", "scaling: x = nodes", "stragglers during training"]


def test_each_point_of_a_two_key_sweep_is_labelled_with_every_key_that_varies(tmp_path, monkeypatch):
    """nodes=1,2 x lr=1e-3,1e-4: labels naming the lr alone would give two rows (and legend entries) each."""
    write_lr_sweep(tmp_path, nodes=1, lrs=(1e-3, 1e-4), finals=(2.0, 2.2))
    write_lr_sweep(tmp_path, nodes=2, lrs=(1e-3, 1e-4), finals=(2.01, 2.21))
    legend, save = [], outputs._save

    def keep_legend(fig, path):
        if path.name == "loss_curves.png":
            legend.extend(t.get_text() for t in fig.axes[0].get_legend().get_texts())
        return save(fig, path)

    monkeypatch.setattr(outputs, "_save", keep_legend)
    out = write_report(tmp_path)
    labels = [r["label"] for r in csv_rows(out / "comparison.csv")]
    assert sorted(labels) == ["nodes=1, train.lr=0.0001", "nodes=1, train.lr=0.001", "nodes=2, train.lr=0.0001",
                              "nodes=2, train.lr=0.001"]
    assert len(legend) == 8 and len(set(legend)) == 8 and "nodes=2, train.lr=0.001 (val)" in legend, legend
    md = (out / "scaling.md").read_text()
    assert "## Comparison: train.lr" in md and "| 1 | nodes=1, train.lr=0.001 |" in md


def test_the_swept_keys_come_from_hydras_saved_overrides(tmp_path):
    write_lr_sweep(tmp_path, lrs=(1e-3, 1e-4), finals=(2.0, 2.2))
    for folder, lr in ((tmp_path / "nodes=1,train.lr=0.001", "1e-3"), (tmp_path / "nodes=1,train.lr=0.0001", "1e-4")):
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text(f"- model=tiny\n- train.lr={lr}\n")
    rep = build_report(tmp_path)
    assert rep.keys == ["train.lr"] and [r.label for r in rep.compare] == ["train.lr=1e-3", "train.lr=1e-4"]


@pytest.mark.slow
def test_a_real_lr_sweep_writes_a_comparison(tmp_path_factory, data_overrides):
    root = tmp_path_factory.mktemp("lr_sweep")
    overrides = [o for o in TINY if not o.startswith(("strategy=", "train.eval_interval"))]
    launch("train.lr=1e-2,1e-3,1e-5", "train.min_lr=0", *overrides, "train.eval_interval=10", "train.eval_batches=2",
           "hydra.sweep.subdir=${hydra.job.override_dirname}", *data_overrides, run_dir=root, multirun=True)
    out = root / "report"
    md = (out / "scaling.md").read_text()
    assert md.startswith("# Sweep report: ") and "## Comparison: train.lr" in md
    assert not SCALING_WORDS.search(md) and not any((out / name).exists() for name in SCALING_ONLY)
    rows = csv_rows(out / "comparison.csv")
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    best = [float(r["best_val_loss"]) for r in rows]
    assert best == sorted(best) and rows[-1]["label"] == "train.lr=1e-05"  # 1e-5 barely moves
    assert all(int(r["steps"]) == 20 and float(r["tokens_per_s"]) > 0 for r in rows)
    assert (out / "loss_curves.png").stat().st_size > 10_000
    events, _ = layout_of(root)
    assert events.Tags()["images"] == ["report/loss_curves"]
