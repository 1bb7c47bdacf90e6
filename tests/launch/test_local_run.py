"""`python -m launch` on this machine, end to end, as a user runs it."""
from __future__ import annotations

import json
import socket

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from launch.recovery.node_heartbeat import node_local_dir
from helpers import launch, losses, read_metrics

TINY = ["model=tiny", "train.max_steps=60", "train.warmup_steps=5", "train.log_interval=5", "train.eval_interval=30",
        "train.eval_batches=4", "train.lr=3e-3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_overrides):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    launch(*TINY, *data_overrides, run_dir=run_dir)
    return run_dir


@pytest.mark.slow
def test_training_lowers_the_loss(tiny_run):
    train = losses(tiny_run)
    val = [r["loss"] for r in read_metrics(tiny_run, kind="val")]
    assert len(train) == 12 and len(val) == 2
    assert train[-1] < train[0] - 0.5, train
    assert val[-1] < val[0], val


@pytest.mark.slow
def test_run_folder_holds_config_environment_metrics_and_checkpoint(tiny_run):
    assert "name: tiny-single" in (tiny_run / "config.yaml").read_text()
    env = json.loads((tiny_run / "environment" / "rank0.json").read_text())
    assert env["world_size"] == 1 and env["packages"]["torch"].startswith("2.")
    record = read_metrics(tiny_run)[-1]
    for key in ("loss", "lr", "tokens_per_s", "step_time_s", "data_time_s", "fwd_bwd_s", "optimizer_s", "comm_s",
                "grad_norm", "mem/rss_gib", "grad_norm/layers.0"):
        assert key in record, key
    assert record["mfu"] is None  # no peak FLOP/s is known for a CPU: "n/a", never a guess
    assert (tiny_run / "checkpoints" / "step_00000060" / "meta.json").is_file()
    assert not node_local_dir(tiny_run, socket.gethostname()).parent.exists()  # the node's memory is given back


@pytest.mark.slow
def test_tensorboard_events_hold_the_training_curves(tiny_run):
    events = EventAccumulator(str(tiny_run / "tensorboard" / "rank0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "train/tokens_per_s", "mem/rss_gib"} <= tags
    assert len(events.Scalars("train/loss")) == 12
    # one event per metrics record, not one per scalar, in one file per attempt that stays open
    records = len((tiny_run / "metrics" / "rank0.jsonl").read_text().splitlines())
    written = sum(1 for f in (tiny_run / "tensorboard" / "rank0").iterdir()
                  for e in EventFileLoader(str(f)).Load()
                  if e.HasField("summary") and e.summary.value[0].metadata.plugin_data.plugin_name != "text")
    assert written <= records, (written, records)


@pytest.mark.slow
def test_same_seed_gives_the_same_losses(tiny_run, tmp_path, data_overrides):
    again = tmp_path / "again"
    launch(*TINY, *data_overrides, run_dir=again)
    assert losses(again) == losses(tiny_run)
