"""A run that diverges keeps its good state (gpt.train.divergence): a non-finite loss is caught before the update
on every rank alike, a loss spike by its z-score, and divergence.policy acts (stop, skip); retention keeps the
newest checkpoint from before the divergence and marks the ones saved after it."""
from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import SHAKESPEARE, compose, launch, plan, read_metrics
from gpt.checkpoint.store import AFTER_DIVERGENCE, list_checkpoints, read_meta, step_of
from gpt.checkpoint.writer import load_model
from gpt.config import schema
from launch import launch_config
from gpt.collectives.process_group import DistEnv
from gpt.errors import ConfigError
from gpt.train import rollback as rollback_module
from gpt.config.divergence import DivergenceConfig
from gpt.train.divergence import Diverged, DivergenceGuard, spread_nonfinite
from gpt.train.optim import build_adamw, step_unless
from gpt.train.trainer import Trainer

NAN_ON_RANK_1 = ["debug.nan_at_step=5", "debug.nan_rank=1"]
SPIKE_ON_RANK_1 = ["debug.spike_at_step=5", "debug.spike_rank=1", "debug.spike_factor=50", "divergence.spike_window=3",
                   "divergence.spike_threshold=4"]
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


@pytest.mark.slow
def test_stop_names_the_step_and_the_newest_good_checkpoint(train):
    run_dir, fit = train("debug.nan_at_step=5")
    with pytest.raises(Diverged, match=r"diverged at step 5: the loss or the gradient norm is not finite.*"
                                       r"step_00000004 \(divergence.policy=stop\)"):
        fit()
    assert [step_of(p) for p in list_checkpoints(run_dir / "checkpoints")] == [2, 4]  # nothing saved after


@pytest.mark.slow
def test_a_divergence_between_log_steps_is_read_at_the_next_save(train):
    """The guard reads its device-side tally at log steps and before a save: the stop still names the first step
    left out, and no checkpoint is saved after it."""
    run_dir, fit = train("debug.nan_at_step=5", "train.log_interval=5")
    with pytest.raises(Diverged, match=r"diverged at step 5: .*step_00000004 \(divergence.policy=stop\)"):
        fit()
    assert [step_of(p) for p in list_checkpoints(run_dir / "checkpoints")] == [2, 4]


def test_the_update_is_left_out_on_the_device():
    """fused AdamW's found_inf: no weight, moment or step count changes where the flag is set, and none is read."""
    w = torch.nn.Parameter(torch.ones(4))
    optimizer = build_adamw(torch.nn.ParameterList([w]), 0.1, 0.1, (0.9, 0.95), torch.device("cpu"))
    w.grad = torch.full((4,), float("nan"))
    step_unless(optimizer, torch.tensor(True))
    assert torch.equal(w.detach(), torch.ones(4)) and not hasattr(optimizer, "found_inf")
    assert not optimizer.state or float(optimizer.state[w]["step"]) == 0
    w.grad = torch.ones(4)
    step_unless(optimizer, torch.tensor(False))
    assert (w.detach() < 1).all() and float(optimizer.state[w]["step"]) == 1
    plain = torch.optim.AdamW([w], foreach=True)
    with pytest.raises(TypeError, match="without fused=True"):
        step_unless(plain, torch.tensor(True))


@pytest.mark.slow
def test_skip_leaves_the_update_out_and_keeps_the_good_checkpoint(train):
    run_dir, fit = train("debug.nan_at_step=5", "divergence.policy=skip", "checkpoint.keep=1")
    summary = fit()
    records = read_metrics(run_dir)
    assert summary.last_step == 10 and [r["step"] for r in records] == list(range(1, 11))
    bad = [r["step"] for r in records if not math.isfinite(r["loss"]) or not math.isfinite(r["grad_norm"])]
    assert bad == [6]  # step 5's record, once 6 are done; the weights stayed finite: its update was left out
    kept = list_checkpoints(run_dir / "checkpoints")
    assert [step_of(p) for p in kept] == [4, 10]  # keep=1, and the newest from before the divergence
    assert AFTER_DIVERGENCE not in read_meta(kept[0]) and read_meta(kept[1])[AFTER_DIVERGENCE] == 5


def test_skip_stops_after_max_skips_in_a_row(train):
    _, fit = train("debug.nan_at_step=3", "divergence.policy=skip", "divergence.max_skips=1")
    with pytest.raises(Diverged, match=r"step 3: .* after 1 in a row \(divergence.max_skips=1\)"):
        fit()


@pytest.mark.slow
def test_a_loss_spike_stops_the_run(train):
    run_dir, fit = train("debug.spike_at_step=8", "debug.spike_factor=50", "divergence.spike_window=4",
                         "divergence.spike_threshold=4")
    with pytest.raises(Diverged, match=r"diverged at step 8: the loss spiked .* of the last 4 logged.*step_00000008"):
        fit()
    assert max(r["step"] for r in read_metrics(run_dir)) == 9  # the record of step 8, once 9 are done


class Checkpoints:
    """What the guard asks of the checkpointer: a folder to list, and where the run diverged."""

    def __init__(self, root):
        self.root, self.diverged_at = root, []

    def diverged(self, step: int) -> None:
        self.diverged_at.append(step)

    def close(self) -> None:
        pass


def test_a_non_finite_logged_loss_never_joins_the_spike_window(tmp_path):
    """Under skip, a NaN logged loss is the step the tally counted: it stays out of the window, whose mean and
    deviation it would poison (statistics raised on it, and every later spike would be judged against NaN)."""
    guard = DivergenceGuard(DivergenceConfig(policy="skip", spike_window=3, spike_threshold=4.0),
                            Checkpoints(tmp_path), is_main=True)
    guard.after_step(2, torch.tensor(True))  # the strategy left step 2's update out: counted on the device
    for step, loss in enumerate([2.0, 2.1, math.nan, 2.0, 2.05]):
        guard.after_record(step, loss)
    assert list(guard.losses) == [2.1, 2.0, 2.05]
    guard.after_record(5, 9.0)  # a spike is still seen against the finite ones
    assert guard.skipped == 1 and guard.checkpointer.diverged_at == [5]


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_under_fp16_a_non_finite_logged_loss_is_a_divergence(tmp_path, loss):
    """fp16's loss scaler skips steps of its own and says nothing of them (no tally): a loss that is not finite
    is then the guard's only sign, and divergence.policy acts on it, spike rule or not."""
    checkpoints = Checkpoints(tmp_path)
    guard = DivergenceGuard(DivergenceConfig(policy="stop"), checkpoints, is_main=True)
    guard.after_step(3, None)
    guard.after_record(3, 2.5)
    with pytest.raises(Diverged, match=rf"diverged at step 4: the logged loss is {loss} \(train.precision=fp16"):
        guard.after_record(4, loss)
    assert checkpoints.diverged_at == [4]


def test_under_fp16_skip_stops_after_max_skips_non_finite_logged_losses_in_a_row(tmp_path):
    guard = DivergenceGuard(DivergenceConfig(policy="skip", max_skips=2), Checkpoints(tmp_path), is_main=True)
    for step, loss in enumerate([2.5, math.nan, 2.4, math.nan]):  # one at a time: skipped, training goes on
        guard.after_record(step, loss)
    assert guard.skipped == 2
    with pytest.raises(Diverged, match=r"diverged at step 4: the logged loss is nan .* after 2 in a row"):
        guard.after_record(4, math.nan)


@pytest.mark.parametrize("key, value", [("policy", "restart"), ("max_skips", 0), ("max_rollbacks", 0),
                                        ("rollback_progress_steps", 0), ("spike_window", 1), ("spike_threshold", 0)])
def test_bad_divergence_values_are_one_line(key, value):
    cfg = compose(f"divergence.{key}={value}")
    with pytest.raises(ConfigError, match=rf"^divergence.{key}={value!r} is not valid: "):
        launch_config.parse(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["strategy=ddp"], ["strategy=zero1"], ["strategy=fsdp"],
                                    ["strategy=pipeline", "strategy.microbatches=2"],
                                    ["strategy=deepspeed", "strategy.stage=0"],
                                    ["strategy=deepspeed", "strategy.stage=2"]],
                         ids=["ddp", "zero1", "fsdp", "pipeline", "deepspeed0", "deepspeed2"])
def test_a_nan_on_one_rank_is_skipped_on_both(tmp_path, data_overrides, layout):
    """Rank 1 alone has a NaN loss at step 3 (on the pipeline, the last stage's rank): both ranks leave that update
    out, and train on with finite weights. DeepSpeed's engine steps itself: ZeRO-1..3 skip a non-finite norm and say
    so; at ZeRO-0 our AdamW is handed the flag."""
    run_dir = tmp_path / "run"
    launch("model=tiny", *layout, "cluster.tasks_per_node=2", "train.max_steps=6", "train.warmup_steps=2",
           "train.eval_interval=0", "train.log_interval=1", "checkpoint.interval_steps=0", "debug.nan_at_step=3",
           "debug.nan_rank=1", "divergence.policy=skip", *data_overrides, run_dir=run_dir)
    for rank in (0, 1):
        records = read_metrics(run_dir, rank)
        assert [r["step"] for r in records] == list(range(1, 7))
        assert [r["step"] for r in records if not math.isfinite(r["grad_norm"])] == [4], f"rank {rank}"
        assert all(math.isfinite(r["loss"]) for r in records if r["step"] > 4), f"rank {rank}"
    assert json.loads((run_dir / "summary.json").read_text())["last_step"] == 6


@pytest.mark.parametrize("layout", [[], pytest.param(["strategy=deepspeed", "strategy.stage=2"],
                                                     marks=pytest.mark.slow)], ids=["ddp", "deepspeed2"])
@pytest.mark.slow
def test_rollback_restores_the_checkpoint_before_and_passes_over_its_batches(train, caplog, monkeypatch, layout):
    """One process: the NaN batch of step 5 makes the run restore step 4's checkpoint (its very weights, under
    DeepSpeed's engine too) and pass over batches 4..5; the run then trains steps 4..9 on batches 6..11, all finite,
    and its checkpoints carry the new position."""
    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed's engine asks for it; a launcher sets it
    restored = []

    def roll_back(r, resume, max_rollbacks):
        done = rollback_module.roll_back(r, resume, max_rollbacks)
        restored.append((done.path, {k: v.clone() for k, v in resume.strategy.unwrapped.state_dict().items()}))
        return done

    monkeypatch.setattr("gpt.train.trainer.roll_back", roll_back)
    run_dir, fit = train("debug.nan_at_step=5", "divergence.policy=rollback", "checkpoint.keep=10", *layout)
    with caplog.at_level("WARNING"):
        summary = fit()
    assert summary.last_step == 10
    [(path, weights)] = restored
    saved = load_model(path)[0].state_dict()
    assert saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k]) for k in saved)
    assert summary.spent["steps"] == 12 and summary.spent["steps_undone"] == 2  # steps 4 and 5 trained again
    line = [r.getMessage() for r in caplog.records if "divergence.policy=rollback" in r.getMessage()]
    assert len(line) == 1 and "step_00000004 (step 4)" in line[0] and "(4..5)" in line[0], line
    rollback = read_metrics(run_dir, kind="rollback")
    assert [(r["step"], r["diverged_at"], r["skipped_batches_from"], r["skipped_batches_to"]) for r in rollback] == \
        [(4, 5, 4, 5)]
    records = read_metrics(run_dir)  # the steps the rollback undid are dropped, as at a resume
    assert [r["step"] for r in records] == list(range(1, 11)) and all(math.isfinite(r["loss"]) for r in records)
    assert [r["step"] for r in records if r["time"] > rollback[0]["time"]] == list(range(5, 11))
    kept = list_checkpoints(run_dir / "checkpoints")
    assert [step_of(p) for p in kept] == [2, 4, 5, 6, 8, 10]  # the step after the rollback is saved
    assert read_meta(kept[2])["data"]["skipped_batches"] == 2 and read_meta(kept[2])[AFTER_DIVERGENCE] == 5


@pytest.mark.slow
def test_rollback_stops_after_max_rollbacks_without_progress(train):
    """debug.spike_at_step names a batch: after the rollback the next batches spike as well (a factor on every step
    from 6 on would be a bad run, not a bad batch); here two NaN batches in a row and max_rollbacks=1."""
    _, fit = train("debug.nan_at_step=5", "divergence.policy=rollback", "divergence.max_rollbacks=1",
                   "debug.spike_at_step=8", "debug.spike_factor=nan")
    with pytest.raises(Diverged, match=r"step 6: .*again after 1 rollbacks without progress .*max_rollbacks=1\)"):
        fit()


@pytest.mark.slow
def test_a_run_resumed_after_a_rollback_does_not_replay_the_batches_it_passed_over(train, tmp_path):
    """Stopped at step 8 after the rollback and resumed to 10, a run trains steps 8 and 9 on the batches an
    uninterrupted run trains them on (10 and 11), not on batches 8 and 9 again."""
    rollback = ("debug.nan_at_step=5", "divergence.policy=rollback", "train.decay_steps=10")
    whole_dir, fit = train(*rollback)
    fit()
    run_dir, fit = train(*rollback, "train.max_steps=8")
    fit()
    assert read_meta(list_checkpoints(run_dir / "checkpoints")[-1])["data"]["skipped_batches"] == 2
    plan(run_dir, *BASE, f"data.dir={tmp_path.parent / 'divergence-data'}", *rollback)
    Trainer(schema.load(run_dir / "config.yaml"), DistEnv(), run_dir).fit()
    whole = {r["step"]: r["loss"] for r in read_metrics(whole_dir)}
    resumed = {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["step"] > 8}
    assert resumed == {9: whole[9], 10: whole[10]}


@pytest.mark.slow
def test_a_stop_right_after_a_rollback_saves_the_new_data_position(train, monkeypatch):
    """A preemption signal agreed on just after the rollback, before the next step: the final save writes the
    restored step again with the batches passed over, so that the resumed run does not replay them."""
    rolled_back = Trainer.roll_back

    def then_stopped(self, r):
        rolled_back(self, r)
        self.stop.reason = "SIGTERM"  # as the step flags set it on every rank

    monkeypatch.setattr(Trainer, "roll_back", then_stopped)
    run_dir, fit = train("debug.nan_at_step=5", "divergence.policy=rollback", "checkpoint.keep=10")
    assert fit().last_step == 4
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    assert step_of(newest) == 4 and read_meta(newest)["data"]["skipped_batches"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["strategy=ddp"], ["strategy=fsdp"], ["strategy=pipeline", "strategy.microbatches=2"]],
                         ids=["ddp", "fsdp", "pipeline"])
def test_rollback_on_two_ranks(tmp_path, data_overrides, layout):
    """Rank 1 alone has a NaN loss on the batch of step 5 (on the pipeline, the last stage's rank): both ranks
    restore step 4's checkpoint (replicated, sharded or split into stages), pass over batches 4..5, record it, and
    train on with finite losses; the user sees one line."""
    run_dir = tmp_path / "run"
    proc = launch("model=tiny", *layout, "cluster.tasks_per_node=2", "train.max_steps=8",
                  "train.warmup_steps=2", "train.eval_interval=0", "train.log_interval=1",
                  "checkpoint.interval_steps=2", "debug.nan_at_step=5", "debug.nan_rank=1",
                  "divergence.policy=rollback", *data_overrides, run_dir=run_dir)
    for rank in (0, 1):
        rollback = read_metrics(run_dir, rank, kind="rollback")
        assert [(r["step"], r["skipped_batches_from"], r["skipped_batches_to"]) for r in rollback] == [(4, 4, 5)]
        records = read_metrics(run_dir, rank)
        assert [r["step"] for r in records] == list(range(1, 9)) and all(math.isfinite(r["loss"]) for r in records)
        assert [r["step"] for r in records if r["time"] > rollback[0]["time"]] == [5, 6, 7, 8]
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if "divergence.policy=rollback" in x]
    assert len(lines) == 1 and "(4..5) are passed over" in lines[0], lines
    assert json.loads((run_dir / "summary.json").read_text())["last_step"] == 8


@pytest.mark.slow
def test_a_loss_spike_rolls_back_past_its_batch(train):
    """The spike's update is already in: the checkpoint of its own step is from before it, and its batch alone is
    passed over."""
    run_dir, fit = train("debug.spike_at_step=8", "debug.spike_factor=50", "divergence.spike_window=4",
                         "divergence.spike_threshold=4", "divergence.policy=rollback")
    assert fit().last_step == 10
    rollback = read_metrics(run_dir, kind="rollback")
    assert [(r["step"], r["skipped_batches_from"], r["skipped_batches_to"]) for r in rollback] == [(8, 8, 8)]
    assert max(r["loss"] for r in read_metrics(run_dir) if r["step"] > 8) < 10  # batches 9 and 10, no spike


@pytest.mark.slow
@pytest.mark.parametrize("layout, fault", [
    (["strategy=ddp"], NAN_ON_RANK_1), (["strategy=ddp"], SPIKE_ON_RANK_1),
    (["strategy=fsdp"], NAN_ON_RANK_1), (["strategy=pipeline", "strategy.microbatches=2"], SPIKE_ON_RANK_1)],
    ids=["ddp-nan", "ddp-spike", "fsdp-nan", "pipeline-spike"])
def test_stop_on_two_ranks_is_one_decision_and_one_line(tmp_path, data_overrides, layout, fault):
    """Rank 1 alone sees the NaN or the spike (its own loss is 50 times the other's; a rule on its own loss would
    stop rank 1 and leave rank 0 waiting in the next step's collective; on the pipeline rank 1 is the last stage,
    the one that computes the loss): both ranks stop at step 5, the user reads one line naming the step and the
    newest checkpoint from before it (replicated, sharded or in stages), and nothing is saved after it."""
    run_dir = tmp_path / "run"
    proc = launch("model=tiny", *layout, "cluster.tasks_per_node=2", "train.max_steps=8",
                  "train.warmup_steps=2", "train.eval_interval=0", "train.log_interval=1",
                  "checkpoint.interval_steps=2", *fault,
                  "divergence.policy=stop", *data_overrides, run_dir=run_dir, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    lines = [x for x in text.splitlines() if "the run diverged at step 5" in x]
    assert len(lines) == 1 and "step_00000004 (divergence.policy=stop)" in lines[0], text
    for rank in (0, 1):
        assert "the run diverged at step 5" in (run_dir / "logs" / f"rank{rank}.log").read_text()
    kept = [step_of(p) for p in list_checkpoints(run_dir / "checkpoints")]
    assert kept == [2, 4], kept
    [attempt] = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert attempt["ended"].startswith("diverged: the run diverged at step 5"), attempt
