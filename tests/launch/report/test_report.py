"""The scaling report: from real run folders, and on synthetic sweeps (efficiency, stragglers, shared hosts, the
model's error and flags, predictions)."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import launch, read_metrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from gpt.config.report import ReportConfig
from gpt.run_folder import STEP_COUNTS, RunFolder
from launch.report import build_report, outputs, write_report
from launch.report.__main__ import main
from launch.report.markdown import markdown

OUTPUTS = ("scaling.csv", "scaling.md", "prediction.csv", "model.json", "throughput.png", "efficiency.png",
           "step_time_per_rank.png", "prediction.png")
CPU_CHART = ("tokens/s per rank (runs: measured, model, ideal; MFU n/a: no peak FLOP/s is known for this device, "
             "e.g. a CPU)")
CORES = len(os.sched_getaffinity(0))  # what each rank may use: threads = cores / ranks on the machine
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
    assert f"report: {root / 'report'}" in proc.stdout
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
        assert row["mfu"] == ""  # no MFU on a CPU: no peak is known
        # one rank never straggles; two that share a loaded machine's cores may (the rule: its own tests)
        assert row["stragglers"] == "0" if ranks == 1 else 0 <= int(row["stragglers"]) <= ranks
        comm = float(np.median([r["comm_s"] / r["step_time_s"] for r in recs]))
        assert float(row["comm_fraction"]) == pytest.approx(comm)
        assert (comm == 0) == (ranks == 1)  # one rank never waits for another
        per_rank_tokens.append(tokens / ranks)
    assert float(rows[0]["efficiency"]) == 1.0
    assert float(rows[1]["efficiency"]) == pytest.approx(per_rank_tokens[1] / per_rank_tokens[0])
    # on one machine the 2 ranks share the 1-rank point's cores: per core, throughput against throughput
    assert float(rows[1]["efficiency_per_core"]) == pytest.approx(
        float(rows[1]["tokens_per_s"]) / float(rows[0]["tokens_per_s"]))
    md = (sweep / "report" / "scaling.md").read_text()
    assert "**strong scaling**" in md and "| nodes=2 | 2 | 2 | ddp | 12 | 6 |" in md
    # two "nodes" of cluster=local share this machine: the report says so, row by row and in a note
    assert [(r["shared_host"], r["threads"]) for r in rows] == [("False", str(CORES)), ("True", str(CORES // 2))]
    assert "> **Shared host.** `nodes=2`: cluster=local: 2 nodes are groups of processes on one machine" in md
    assert "not network scaling. The performance model leaves them out of its fit" in md


@pytest.mark.slow
def test_report_states_the_models_error_on_every_point(sweep):
    md = (sweep / "report" / "scaling.md").read_text()
    rows = {r["point"]: r for r in csv_rows(sweep / "report" / "scaling.csv")}
    assert "### Model error" in md and "(leave-one-out needs 3 points or more)" in md
    # the communication term is built from what the strategy lists: nothing on one rank, DDP's all-reduce on two
    assert "- collectives per step (`nodes=1`): no communication" in md  # each list names its points
    assert "- collectives per step (`nodes=2`): all_reduce over dp: fp32 gradients, in buckets" in md
    for name, row in rows.items():
        measured, model = float(row["step_time_p50_s"]), float(row["predicted_step_time_s"])
        assert float(row["model_error"]) == pytest.approx(model / measured - 1)
        line = next(x for x in md.splitlines() if x.startswith(f"| {name} | {measured:.4g} | {model:.4g} | "))
        assert (abs(model / measured - 1) > 0.10) == line.endswith("| **no** |") == bool(row["model_flag"])
        assert (f"- `{name}` is off by more than 10%: {row['model_flag']}." in md) == bool(row["model_flag"])
    model = json.loads((sweep / "report" / "model.json").read_text())
    assert model["comm_scale"] == 1.0 and "shared-host points out" in model["method"]  # k not from loopback
    assert float(rows["nodes=1"]["model_error"]) == pytest.approx(0, abs=1e-9)  # the reference is reproduced


@pytest.mark.slow
def test_report_files_exist(sweep):
    for name in OUTPUTS:
        path = sweep / "report" / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = json.loads((sweep / "report" / "model.json").read_text())
    assert model["mode"] == "strong" and model["network"]["inter_node_GBps"] == 50.0
    predictions = csv_rows(sweep / "report" / "prediction.csv")
    every = [1, 2, 8, 16, 32, 64, 128, 256, 512, 1024]
    for kept in ("weak", "strong"):
        assert [int(r["nodes"]) for r in predictions if r["scaling"] == kept] == every
    # strong scaling of a global batch of 12 ends at 12 ranks; the weak-scaling rows fill 8 to 1,024 nodes
    assert [r["feasible"] for r in predictions if r["scaling"] == "strong"] == ["True"] * 2 + ["False"] * 8
    weak = [r for r in predictions if r["scaling"] == "weak"]
    assert all(r["feasible"] == "True" and float(r["step_time_s"]) > 0 for r in weak)
    assert [int(r["global_batch"]) for r in weak] == [12 * n for n in every]
    md = (sweep / "report" / "scaling.md").read_text()
    assert "### Predicted: Weak scaling: 12 sequence(s) per data-parallel rank" in md
    assert "| 1024 | 1024 | 12288 | " in md


@pytest.mark.slow
def test_tensorboard_scaling_run_holds_the_scalars_and_the_custom_scalars_layout(sweep):
    runs = {}
    for run in ("", "model", "ideal"):
        runs[run] = EventAccumulator(str(sweep / "tensorboard" / "scaling" / run), size_guidance={"tensors": 0})
        runs[run].Reload()
    events = runs[""]
    scalars = {run: set(e.Tags()["scalars"]) for run, e in runs.items()}
    assert {"scaling/tokens_per_s", "scaling/efficiency", "scaling/step_time_p50_s", "scaling/step_time_p90_s",
            "scaling/comm_fraction"} <= scalars[""]
    assert {"scaling/tokens_per_s", "scaling/efficiency", "scaling/step_time_p50_s", "predicted_weak/efficiency",
            "predicted_strong/step_time_s"} <= scalars["model"]
    assert scalars["ideal"] == {"scaling/tokens_per_s", "scaling/tokens_per_s_per_rank", "scaling/efficiency"}
    # a chart of one two-point series is drawn empty by TensorBoard (outliers ignored): every chart of the
    # scaling category draws from several runs or several tags
    assert "scaling/tokens_per_s_per_rank" in scalars["model"]
    first = events.Scalars("scaling/efficiency")[0]
    assert (first.step, round(first.value, 3)) == (1, 1.0)
    assert [e.step for e in events.Scalars("scaling/tokens_per_s")] == [1, 2]
    model = runs["model"]
    assert [e.step for e in model.Scalars("predicted_weak/efficiency")] == [1, 2, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert [e.step for e in model.Scalars("predicted_strong/efficiency")] == [1, 2]  # a global batch of 12
    # exact figures first: the report's plots as images, its summary and tables as text
    assert set(events.Tags()["images"]) == {"report/throughput", "report/efficiency", "report/step_time_per_rank",
                                             "report/prediction"}
    assert {"report/1_summary/text_summary", "report/2_tables/text_summary",
            "report/3_full/text_summary"} <= set(events.Tags()["tensors"])
    summary = events.Tensors("report/1_summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "**Shared host.**" in summary and "### Model error" in summary
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {ch.title: ch for c in layout.category for ch in c.chart}
    assert [c.title.split(" (")[0] for c in layout.category] == ["scaling: x = nodes", "stragglers during training"]
    assert "set smoothing to 0" in layout.category[0].title
    throughput = next(ch for t, ch in charts.items() if t.startswith("throughput vs nodes"))
    assert list(throughput.multiline.tag) == [r"^scaling/tokens_per_s$"]  # drawn from 3 runs: a colour each
    # no chart is empty without a word on why: MFU is n/a on a CPU, and the chart says so
    assert CPU_CHART in charts
    every_tag = set().union(*scalars.values())
    for chart in layout.category[0].chart:
        for pattern in chart.multiline.tag:
            assert any(re.search(pattern, t) for t in every_tag), pattern


@pytest.mark.slow
def test_offline_report_equals_the_one_written_at_the_end_of_the_sweep(sweep, capsys):
    before = {n: (sweep / "report" / n).read_bytes() for n in OUTPUTS if not n.endswith(".png")}
    assert main([str(sweep)]) == 0
    assert "# Scaling report" in capsys.readouterr().out
    after = {n: (sweep / "report" / n).read_bytes() for n in before}
    assert after == before
    assert len(list((sweep / "tensorboard" / "scaling").glob("**/events.*"))) == 3  # replaced, not appended to
    # a single run folder is a report of one point
    out = write_report(sweep / "nodes=2")
    assert [r["point"] for r in csv_rows(out / "scaling.csv")] == ["nodes=2"]
    assert (sweep / "nodes=2" / "tensorboard" / "scaling").is_dir()


def test_a_folder_without_runs_is_a_user_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no run folder" in capsys.readouterr().err


# --- synthetic sweeps ---------------------------------------------------------------------------------
def write_point(folder: Path, nodes: int, tasks: int, global_batch: int, step_times, comm=None, hosts=None,
                compute=None,
                strategy: str = "ddp", block: int = 64, cluster: str = "slurm", env=None, lr: float = 1e-3,
                val=((99, 1.0),), losses=None, mfu=None, clock=None) -> None:
    """A run folder as the trainer writes it; step_times[rank][window] (or one list for every rank); env(rank) gives
    more keys of environment/rank<R>.json; val: (step, loss) records; losses: the train loss of each window;
    clock: the wall-clock time each window ends (its attempt started at clock[0] - 1 s)."""
    ranks = nodes * tasks
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        f"model:\n  name: tiny\n  n_layer: 2\n  n_head: 2\n  n_embd: 64\n  block_size: {block}\n  vocab_size: 65\n"
        f"train:\n  global_batch_size: {global_batch}\n  precision: fp32\n  lr: {lr}\n"
        f"strategy:\n  name: {strategy}\n  bucket_cap_mb: 25\ncluster:\n  name: {cluster}\n"
        f"  tasks_per_node: {tasks}\nnodes: {nodes}\n")
    (folder / "metrics").mkdir()
    (folder / "environment").mkdir()
    for r in range(ranks):
        host = hosts[r] if hosts else f"node{r // tasks}"
        (folder / "environment" / f"rank{r}.json").write_text(json.dumps(
            {"rank": r, "world_size": ranks, "num_nodes": nodes, "host": host, **(env(r) if env else {})}))
        times = step_times[r] if isinstance(step_times[0], list) else step_times
        lines = []
        for w, t in enumerate(times):
            rec = {"kind": "train", "step": 5 * w + 5, STEP_COUNTS: "done", "rank": r, "host": host, "step_time_s": t,
                   "tokens_per_s": global_batch * block / t, "mfu": mfu, "loss": losses[w] if losses else 2.0}
            if comm is not None:
                rec["comm_s"] = comm[r][w] if isinstance(comm[r], list) else comm[r]
            if compute is not None:
                rec["compute_s"] = compute[r]
            if clock is not None:
                rec.update(time=clock[w], elapsed_s=clock[w] - clock[0] + 1)
            lines.append(json.dumps(rec))
        lines += [json.dumps({"kind": "val", "step": step, "rank": r, "loss": loss}) for step, loss in val]
        (folder / "metrics" / f"rank{r}.jsonl").write_text("\n".join(lines) + "\n")


def test_weak_scaling_efficiency(tmp_path):
    for nodes, t in ((1, 1.0), (2, 1.25), (4, 1.6)):
        write_point(tmp_path / f"nodes={nodes}", nodes, 1, 8 * nodes, [9.0, t, t, t])  # 8 sequences per rank
    rep = build_report(tmp_path)
    assert rep.mode == "weak"
    assert [r.efficiency for r in rep.rows] == pytest.approx([1.0, 0.8, 0.625])
    assert [r.step_time_p50_s for r in rep.rows] == pytest.approx([1.0, 1.25, 1.6])  # the 9 s window is skipped


def test_a_point_that_has_not_finished_is_named_with_the_step_it_reached(tmp_path):
    """A cancelled point's tokens/s are those of the steps it ran: the report says it stands short of its end."""
    for nodes in (1, 2):
        write_point(tmp_path / f"nodes={nodes}", nodes, 1, 8 * nodes, [1.0, 1.0, 1.0, 1.0])
        config = tmp_path / f"nodes={nodes}" / "config.yaml"
        config.write_text(config.read_text().replace("train:\n", "train:\n  max_steps: 100\n"))
    (tmp_path / "nodes=1" / "summary.json").write_text("{}")  # finished (its last step logged or not)
    md = markdown(build_report(tmp_path))
    assert ("> **Not finished.** `nodes=2` at step 20 of 100: the figures are of the steps run so far" in md
            and "nodes=1` at" not in md), md[:1500]
    saved = tmp_path / "nodes=2" / "checkpoints" / "step_00000026"  # a stop saved after the last logged step
    saved.mkdir(parents=True)
    (saved / ".metadata").write_text("")
    (saved / "meta.json").write_text('{"step": 26, "files": {".metadata": 0}}')  # written last: the save is whole
    md = markdown(build_report(tmp_path))
    assert ("> **Not finished.** `nodes=2` at step 26 of 100: the figures are of the steps run so far" in md
            and "nodes=1` at" not in md), md[:1500]


@pytest.mark.slow
def test_strong_scaling_efficiency_and_mixed(tmp_path):
    for nodes, t in ((1, 1.0), (2, 0.625), (4, 0.5)):
        write_point(tmp_path / "strong" / f"nodes={nodes}", nodes, 1, 16, [t, t, t])
    rep = build_report(tmp_path / "strong", ReportConfig(skip_windows=0))
    assert rep.mode == "strong"
    assert [r.efficiency for r in rep.rows] == pytest.approx([1.0, 0.8, 0.5])  # t0 r0 / (t r)
    strong = [p for p in rep.predictions if p["scaling"] == "strong" and p["nodes"] >= 8]
    assert [p["feasible"] for p in strong] == [True, True, False, False, False, False, False, False]
    weak = [p for p in rep.predictions if p["scaling"] == "weak" and p["nodes"] >= 8]
    assert [(p["feasible"], p["global_batch"]) for p in weak] == [(True, 16 * n) for n in rep.config.predict_nodes]
    md = (write_report(tmp_path / "strong", ReportConfig(skip_windows=0)) / "scaling.md").read_text()
    assert "### Predicted: Weak scaling" in md and "### Predicted: Strong scaling" in md
    assert "the weak-scaling rows go on" in md
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


def test_report_names_a_gpu_straggler_from_its_device_compute(tmp_path):
    # On GPUs: equal step times and no host wait; the fast ranks' devices waited in the gradient reduction.
    write_point(tmp_path / "nodes=2", 2, 2, 16, [1.0] * 5, comm=[0.0] * 4, compute=[0.6, 0.6, 1.0, 0.61],
                hosts=["a", "a", "b", "b"])
    row = build_report(tmp_path).rows[0]
    assert (row.stragglers, row.straggler_ranks) == (1, "2@b")
    assert row.compute_s == pytest.approx(0.605)


def test_the_report_files_are_the_same_from_any_directory_and_from_a_copy(tmp_path, monkeypatch):
    for n in (1, 2):
        write_point(tmp_path / "a" / "sweep" / f"nodes={n}", n, 1, 12, [0.1] * 3)
    texts = []
    for cwd, folder in ((tmp_path / "a", "sweep"), (tmp_path / "a" / "sweep", "."), (tmp_path, "a/sweep")):
        monkeypatch.chdir(cwd)
        out = write_report(folder)
        texts.append({name: (out / name).read_text() for name in ("scaling.md", "scaling.csv", "model.json")})
    shutil.copytree(tmp_path / "a" / "sweep", tmp_path / "b" / "sweep")
    out = write_report(tmp_path / "b" / "sweep")
    texts.append({name: (out / name).read_text() for name in ("scaling.md", "scaling.csv", "model.json")})
    assert all(t == texts[0] for t in texts[1:])
    assert "# Scaling report: sweep\n" in texts[0]["scaling.md"]
    assert "`tensorboard --logdir ..` from this report's folder" in texts[0]["scaling.md"]


def test_report_of_many_ranks(tmp_path):
    write_point(tmp_path / "nodes=10", 10, 8, 160, [0.5, 0.5])  # 80 ranks: a histogram instead of 80 boxes
    out = write_report(tmp_path)
    assert (out / "step_time_per_rank.png").stat().st_size > 0
    assert [r["ranks"] for r in csv_rows(out / "scaling.csv")] == ["80"]


# --- where the ranks ran: shared hosts ----------------------------------------------------------------
def machine(boot_ids, cpus: int = 4, threads: int = 2):
    """environment keys of each rank: its machine (boot id), cores, affinity and threads."""
    return lambda r: {"machine_id": boot_ids[r], "cpu_count": cpus, "cpu_affinity": list(range(cpus)),
                      "threads": threads}


@pytest.mark.slow
def test_shared_host_is_read_from_machine_ids_then_host_names_then_the_cluster(tmp_path):
    hosts = ["gl-n1", "gl-n2"]
    # the local test cluster: two namespaces with their own host names on one machine (one boot id)
    write_point(tmp_path / "a" / "nodes=2", 2, 1, 12, [0.1] * 3, hosts=hosts, env=machine(["m0", "m0"]))
    # two real machines
    write_point(tmp_path / "b" / "nodes=2", 2, 1, 12, [0.1] * 3, hosts=hosts, env=machine(["m0", "m1"]))
    # folders written before machine ids were recorded: cluster=local, or one host name for two nodes
    write_point(tmp_path / "c" / "nodes=2", 2, 1, 12, [0.1] * 3, cluster="local", hosts=["vm", "vm"])
    write_point(tmp_path / "d" / "nodes=2", 2, 1, 12, [0.1] * 3, hosts=["vm", "vm"])
    write_point(tmp_path / "e" / "nodes=2", 2, 1, 12, [0.1] * 3, hosts=hosts)
    shared = {k: build_report(tmp_path / k).rows[0].shared_host for k in "abcde"}
    assert shared == {"a": True, "b": False, "c": True, "d": True, "e": False}
    a = build_report(tmp_path / "a").points[0]
    assert (a.shared_host, a.cores_per_rank) == ("2 nodes (gl-n1, gl-n2) on 1 machine(s)", 2)  # 4 cores, 2 ranks
    assert build_report(tmp_path / "b").points[0].cores_per_rank == 2  # each rank: its 2 threads of 4 cores
    write_point(tmp_path / "f" / "nodes=2", 2, 1, 12, [0.1] * 3, hosts=hosts,
                env=lambda r: {**machine(["m0", "m1"])(r), "gpu": "NVIDIA H100 80GB HBM3"})
    assert build_report(tmp_path / "f").points[0].cores_per_rank is None  # ranks compute on their GPUs
    md = (write_report(tmp_path / "a") / "scaling.md").read_text()
    assert "> **Shared host.** `nodes=2`: 2 nodes (gl-n1, gl-n2) on 1 machine(s); 2 thread(s) per rank" in md
    assert "shared host" not in (write_report(tmp_path / "b") / "scaling.md").read_text().split("## Measured")[0]


def test_points_that_ran_at_the_same_time_on_a_machine_share_it_and_stay_out_of_the_fit(tmp_path):
    """A cluster that lets jobs share nodes ran nodes=1 and nodes=2 at once on gl-n1; nodes=4 ran alone later."""
    hosts = [f"gl-n{i + 1}" for i in range(4)]
    for n, step, start in ((1, 0.4, 1000.0), (2, 0.15, 1002.0), (4, 0.1, 2000.0)):
        write_point(tmp_path / f"nodes={n}", n, 1, 12, [step] * 4, comm=[0.01] * n, hosts=hosts[:n],
                    env=machine(hosts[:n], cpus=2, threads=2), clock=[start + 10 * w for w in range(4)])
    rep = build_report(tmp_path)
    assert [r.shared_host for r in rep.rows] == [True, True, False]
    assert rep.points[0].shared_host == "ran at the same time as `nodes=2` on the machine of gl-n1"
    assert "c from the busy time of the 1 point(s) on machines of their own" in rep.model.method
    md = markdown(rep)
    assert "| nodes=1 | 1 | 1 | ddp | 12 | 12 |" in md and "| 100.0% | 100.0% | 2 | yes |" in md
    assert "- `nodes=4` is above 100% (per rank 100.0%" not in md  # 12 sequences over 4 ranks: 4 x 0.1 s = 0.4 s
    assert "- `nodes=2` is above 100% (per rank 133.3%, per core 133.3%): the reference `nodes=1` shared" in md


def test_a_packed_sweep_that_ran_at_once_names_a_few_neighbours_and_lists_a_few_points(tmp_path):
    """30 seeds packed on one node at once: each note names 3 of its 29 neighbours, and the note lists the first and
    last points with the count between, as the tables do, not 30 lines of 29 names."""
    for seed in range(30):
        write_point(tmp_path / f"seed={seed:02d}", 1, 1, 12, [0.1] * 4, hosts=["gl-n1"], env=machine(["m0"]),
                    clock=[1000.0 + 10 * w for w in range(4)])
    rep = build_report(tmp_path)
    assert rep.points[0].shared_host == ("ran at the same time as `seed=01`, `seed=02`, `seed=03` and 26 more on the "
                                         "machine of gl-n1")
    md = markdown(rep)
    assert md.count("> **Shared host.**") == 20 and "> ... 10 more point(s) that shared a host" in md
    with (write_report(tmp_path) / "scaling.csv").open() as f:
        assert sum(row["shared_host"] == "True" for row in csv.DictReader(f)) == 30


def test_a_gap_between_attempts_is_no_window_and_another_point_in_it_runs_alone(tmp_path):
    write_point(tmp_path / "nodes=1", 1, 1, 12, [0.1] * 4, env=machine(["m0"]), clock=[1000.0, 1010.0, 2000.0, 2010.0])
    path = tmp_path / "nodes=1" / "metrics" / "rank0.jsonl"  # a requeued second attempt started at 1995 s
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for rec in records[2:4]:
        rec["elapsed_s"] = rec["time"] - 1995.0
    path.write_text("\n".join(json.dumps(rec) for rec in records) + "\n")
    write_point(tmp_path / "nodes=2", 2, 1, 12, [0.1] * 4, comm=[0.0] * 2, hosts=["node0", "node1"],
                env=machine(["m0", "m1"]), clock=[1500.0 + 10 * w for w in range(4)])
    assert [p.shared_host for p in build_report(tmp_path).points] == ["", ""]
    write_point(tmp_path / "nodes=3", 3, 1, 12, [0.1] * 4, hosts=["node0", "x", "y"], env=machine(["m0", "m5", "m6"]),
                clock=[2003.0 + w for w in range(4)])
    assert [bool(p.shared_host) for p in build_report(tmp_path).points] == [True, False, True]


@pytest.mark.slow
def test_the_model_error_is_stated_and_a_point_missed_by_more_than_10_percent_is_flagged_with_its_cause(tmp_path):
    # the local test cluster, 2 cores: 1, 2 and 4 "nodes" of one rank each share one machine
    for n, step, comm in ((1, 0.1, None), (2, 0.125, 0.025), (4, 0.3, 0.02)):
        write_point(tmp_path / "clean" / f"nodes={n}", n, 1, 12, [step] * 4, comm=comm and [comm] * n,
                    hosts=[f"gl-n{i + 1}" for i in range(n)], env=machine(["m0"] * n, cpus=2, threads=max(2 // n, 1)))
    rep = build_report(tmp_path / "clean")
    assert [r.shared_host for r in rep.rows] == [False, True, True]
    assert all(r.loo_error is not None for r in rep.rows)  # three points: leave-one-out too
    md = (write_report(tmp_path / "clean") / "scaling.md").read_text()
    assert "fitted to every point and, leave-one-out, to every other point" in md
    flags = {r.point: r.model_flag for r in rep.rows}
    # 2 ranks x 1 core compute as fast as 1 rank x 2 cores, but wait 0.025 s of 0.125 s over loopback, which no
    # network term describes; 4 ranks x 1 thread on 2 cores are oversubscribed
    assert flags["nodes=4"].startswith("oversubscribed: 4 ranks x 1 threads on 2 cores")
    assert flags["nodes=2"].startswith("shared host: 0.025 s of each step is spent in collectives over loopback")
    assert flags["nodes=1"] == ""
    assert "| nodes=2 | 0.125 | 0.1 | -20.0% | " in md and "- `nodes=2` is off by more than 10%: shared host: 0.025 s" in md
    # oversubscribed (3 ranks x 1 thread on 2 cores) but faster than the model: the cause must agree with the sign
    write_point(tmp_path / "clean" / "nodes=3", 3, 1, 12, [0.05] * 4, comm=[0.0] * 3,
                hosts=["gl-n1", "gl-n2", "gl-n3"], env=machine(["m0"] * 3, cpus=2, threads=1))
    faster = next(r for r in build_report(tmp_path / "clean").rows if r.point == "nodes=3")
    assert faster.model_error > 0.1 and faster.model_flag.startswith(
        "shared host: compute: its busy time per sequence is 0.50x the model's"), faster.model_flag
    # machines of their own, computing as the model says: the miss is in their collectives, either way
    for n, comm in ((1, 0.0), (2, 0.01), (4, 0.09)):
        write_point(tmp_path / "net" / f"nodes={n}", n, 1, 12 * n, [0.1 + comm] * 4, comm=[comm] * n,
                    env=machine([f"m{i}" for i in range(n)], cpus=2, threads=2))
    net = {r.point: r.model_flag for r in build_report(tmp_path / "net").rows}
    assert net["nodes=2"].startswith("communication: less time in collectives than the model's"), net
    # a noisy point says so
    write_point(tmp_path / "noisy" / "nodes=1", 1, 1, 12, [0.1, 0.2, 0.2, 0.2, 0.5, 0.5])
    write_point(tmp_path / "noisy" / "nodes=2", 2, 1, 12, [0.05] * 4, comm=[0.0, 0.0], hosts=["a", "b"])
    noisy = {r.point: r.model_flag for r in build_report(tmp_path / "noisy").rows}
    assert noisy["nodes=1"].startswith("noisy: step time p90 is") and "the fit rests on noisy point(s) nodes=1 (p90 > 1.3x p50)" in noisy[
        "nodes=2"]


def test_the_dashboard_charts_mfu_where_it_is_known_and_says_why_not_elsewhere(tmp_path):
    from launch.report.tensorboard import layout

    for n in (1, 2):
        write_point(tmp_path / "gpu" / f"nodes={n}", n, 8, 64, [0.2] * 3, mfu=0.41)
        write_point(tmp_path / "cpu" / f"nodes={n}", n, 1, 12, [0.2] * 3)
    charts = {root: {t for c in layout(build_report(tmp_path / root)).values() for t in c} for root in ("gpu", "cpu")}
    assert "tokens/s per rank (runs: measured, model, ideal) and MFU" in charts["gpu"]
    assert CPU_CHART in charts["cpu"]
    assert "stragglers (communication fraction n/a: comm_s not recorded)" in charts["cpu"]


def table(md: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first table after `heading`, by their first cell."""
    lines = md.split(heading, 1)[1].split("\n|", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return {cells[0]: cells for cells in ([c.strip() for c in r.strip("|").split("|")] for r in lines)}


@pytest.mark.slow
def test_every_model_figure_drawn_is_the_figure_in_the_tables(tmp_path, monkeypatch):
    """`make run`'s sweep: 1 rank of 2 cores, then 2 "nodes" of one 1-core rank each on that machine (strong
    scaling). The model of nodes=2 as it ran (compute on 1 core) is one figure: in the model-error table, in the
    prediction table, and on every plot that draws it."""
    for n, step in ((1, 0.02), (2, 0.045)):
        write_point(tmp_path / f"nodes={n}", n, 1, 48, [step] * 4, comm=[0.002] * n if n > 1 else None,
                    hosts=[f"gl-n{i + 1}" for i in range(n)], env=machine(["m0"] * n, cpus=2, threads=2 // n))
    drawn = {}
    save = outputs._save
    monkeypatch.setattr(outputs, "_save", lambda fig, path: drawn.setdefault(path.name, {
        (ax.get_title(), line.get_label()): dict(zip(line.get_xdata(), line.get_ydata())) for ax in fig.axes
        for line in ax.get_lines()}) and save(fig, path))
    md = (write_report(tmp_path) / "scaling.md").read_text()
    errors = table(md, "### Model error")
    strong = table(md, "### Predicted: Strong scaling")
    assert strong["2 (*as run*)"][3] == errors["nodes=2"][2] != strong["8"][3]  # as run; on machines of its own
    model_step = drawn["prediction.png"][("Step time, strong scaling: model and measurements",
                                          "model: step (as run where measured)")]
    assert {n: f"{y:.4g}" for n, y in model_step.items()} == {int(k.split()[0]): v[3] for k, v in strong.items()
                                                             if v[3] != "global batch < data-parallel ranks"}
    efficiency = drawn["efficiency.png"][("Efficiency vs nodes (vs 1 node(s))", "model, strong scaling")]
    assert {n: f"{y:.1f}%" for n, y in efficiency.items()} == {  # drawn in percent
        int(k.split()[0]): v[7] for k, v in strong.items() if v[3] != "global batch < data-parallel ranks"}
    rows = sorted(build_report(tmp_path).rows, key=lambda r: r.nodes)
    throughput = drawn["throughput.png"][("Throughput vs nodes (strong)", "model")]
    assert [f"{r.tokens_per_step / throughput[r.nodes]:.4g}" for r in rows] == [errors[r.point][2] for r in rows]


def test_the_report_links_each_points_traces_of_every_attempt(tmp_path):
    for nodes in (1, 2):
        write_point(tmp_path / f"nodes={nodes}", nodes, 1, 8, [1.0, 1.0])
    for attempt in (1, 2):  # a requeued attempt's trace beside the first one's
        trace = RunFolder(tmp_path / "nodes=2").profile_trace(attempt, 1)
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text("{}")
    text = markdown(build_report(tmp_path))
    assert "| nodes=2 | [attempt-1/rank1](../nodes=2/profiles/attempt-1/rank1.pt.trace.json), " \
           "[attempt-2/rank1](../nodes=2/profiles/attempt-2/rank1.pt.trace.json) |" in text
    assert "| nodes=1 |" not in text.split("## Profiler traces")[1]


def test_the_figures_of_eval_jobs_join_the_runs_metrics_tensorboard_and_report(tmp_path):
    """eval.after_save=job: each evaluation job's line (python -m gpt.evaluate --record) is in metrics/ and
    TensorBoard; the report reads a task's newest score from whichever is newer, and a validation loss from the
    jobs where training measured none at that step."""
    from gpt.evaluate import record
    from launch.report.points import load_point

    run = tmp_path / "run"
    write_point(run, 1, 1, 8, [0.1], val=((10, 1.5),))
    for step, loss, acc in ((10, 1.6, 0.25), (20, 1.2, 0.5)):
        record(run, {"checkpoint": str(run / "checkpoints" / f"step_{step:08d}"), "step": step, "val_loss": loss,
                     "perplexity": 3.3, "tasks/order/acc": acc})
    lines = [json.loads(line) for line in (run / "metrics" / "eval_jobs.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"], r["tasks/order/acc"]) for r in lines] == [("eval_job", 10, 0.25),
                                                                             ("eval_job", 20, 0.5)]
    board = EventAccumulator(str(RunFolder(run).eval_jobs_board))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("eval_job/val_loss")] == [(10, pytest.approx(1.6)),
                                                                               (20, pytest.approx(1.2))]
    assert [e.step for e in board.Scalars("tasks/order/acc")] == [10, 20]
    point = load_point(run, tmp_path)
    assert point.val_loss == [(10, 1.5), (20, 1.2)]  # step 10: the training's own measurement
    assert point.tasks == {"order/acc": (20, 0.5)}
    assert "| run | order | 20 | 50.0% | n/a |" in markdown(build_report(run))
