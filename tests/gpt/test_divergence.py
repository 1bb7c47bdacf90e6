"""A run that diverges keeps its good state (gpt.train.divergence): a non-finite loss is caught before the update
on every rank alike, a loss spike by its z-score, and divergence.policy acts (stop, skip); retention keeps the
newest checkpoint from before the divergence and marks the ones saved after it."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import REPO, SHAKESPEARE, launch, plan, read_metrics
from gpt.checkpoint.store import AFTER_DIVERGENCE, list_checkpoints, read_meta, step_of
from gpt.config import schema
from gpt.config.schema import run_config
from gpt.dist.process_group import DistEnv
from gpt.errors import ConfigError
from gpt.train.divergence import Diverged, spread_nonfinite
from gpt.train.trainer import Trainer

BASE = ["model=tiny", "train.max_steps=10", "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=0",
        "train.progress=false", f"data.text_path={SHAKESPEARE}", "checkpoint.interval_steps=2"]


@pytest.fixture
def train(tmp_path_factory):
    prepared = tmp_path_factory.getbasetemp() / "divergence-data"

    def run(*overrides: str):
        run_dir = plan(tmp_path_factory.mktemp("run"), *BASE, f"data.dir={prepared}", *overrides)
        return run_dir, lambda: Trainer(schema.load(run_dir / "config.yaml"), DistEnv(), run_dir).fit()

    return run


def test_an_infinite_loss_with_finite_gradients_poisons_them():
    """Cross-entropy can be infinite while its gradients are finite: only gradients are reduced before the
    update, so the loss must make them non-finite itself."""
    w = torch.ones(3, requires_grad=True)
    (w.sum() + torch.tensor(float("inf"))).backward()
    assert torch.isfinite(w.grad).all()  # what the step would have seen without the spread
    w.grad = None
    spread_nonfinite(w.sum() + torch.tensor(float("inf"))).backward()
    assert not torch.isfinite(w.grad).any()
    w.grad = None
    spread_nonfinite(w.sum()).backward()
    assert torch.equal(w.grad, torch.ones(3))  # a finite loss: exactly as before


def test_stop_names_the_step_and_the_newest_good_checkpoint(train):
    run_dir, fit = train("debug.nan_at_step=5")
    with pytest.raises(Diverged, match=r"diverged at step 5: the loss or the gradient norm is not finite.*"
                                       r"step_00000004 \(divergence.policy=stop\)"):
        fit()
    assert [step_of(p) for p in list_checkpoints(run_dir / "checkpoints")] == [2, 4]  # nothing saved after


def test_skip_leaves_the_update_out_and_keeps_the_good_checkpoint(train):
    run_dir, fit = train("debug.nan_at_step=5", "divergence.policy=skip", "checkpoint.keep=1")
    summary = fit()
    records = read_metrics(run_dir)
    assert summary["last_step"] == 10 and [r["step"] for r in records] == list(range(10))
    bad = [r["step"] for r in records if not math.isfinite(r["loss"]) or not math.isfinite(r["grad_norm"])]
    assert bad == [5]  # the weights stayed finite: the NaN step's update was left out
    kept = list_checkpoints(run_dir / "checkpoints")
    assert [step_of(p) for p in kept] == [4, 10]  # keep=1, and the newest from before the divergence
    assert AFTER_DIVERGENCE not in read_meta(kept[0]) and read_meta(kept[1])[AFTER_DIVERGENCE] == 5


def test_skip_stops_after_max_skips_in_a_row(train):
    _, fit = train("debug.nan_at_step=3", "divergence.policy=skip", "divergence.max_skips=1")
    with pytest.raises(Diverged, match=r"step 3: .* after 1 in a row \(divergence.max_skips=1\)"):
        fit()


def test_a_loss_spike_stops_the_run(train):
    run_dir, fit = train("debug.spike_at_step=8", "debug.spike_factor=50", "divergence.spike_window=4",
                         "divergence.spike_threshold=4")
    with pytest.raises(Diverged, match=r"diverged at step 8: the loss spiked .* of the last 4 logged.*step_00000008"):
        fit()
    assert max(r["step"] for r in read_metrics(run_dir)) == 8


@pytest.mark.parametrize("key, value", [("policy", "rollback"), ("max_skips", 0), ("spike_window", 1),
                                        ("spike_threshold", 0)])
def test_bad_divergence_values_are_one_line(key, value):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"divergence.{key}={value}"])
    with pytest.raises(ConfigError, match=rf"^divergence.{key}={value!r} is not valid: "):
        run_config(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["strategy=ddp"], ["strategy=fsdp"],
                                    ["strategy=pipeline", "strategy.microbatches=2"]], ids=["ddp", "fsdp", "pipeline"])
def test_a_nan_on_one_rank_is_skipped_on_both(tmp_path, data_overrides, layout):
    """Rank 1 alone has a NaN loss at step 3 (on the pipeline, the last stage's rank): both ranks leave that update
    out, and train on with finite weights."""
    run_dir = tmp_path / "run"
    launch("model=tiny", *layout, "cluster.tasks_per_node=2", "train.max_steps=6", "train.warmup_steps=2",
           "train.eval_interval=0", "train.log_interval=1", "checkpoint.interval_steps=0", "debug.nan_at_step=3",
           "debug.nan_rank=1", "divergence.policy=skip", *data_overrides, run_dir=run_dir)
    for rank in (0, 1):
        records = read_metrics(run_dir, rank)
        assert [r["step"] for r in records] == list(range(6))
        assert [r["step"] for r in records if not math.isfinite(r["grad_norm"])] == [3], f"rank {rank}"
        assert all(math.isfinite(r["loss"]) for r in records if r["step"] > 3), f"rank {rank}"
    assert json.loads((run_dir / "summary.json").read_text())["last_step"] == 6
