"""The training loop in one process: precision, accumulation, compile, and what it records."""
from __future__ import annotations

import math
import weakref

import pytest
import torch

from helpers import SHAKESPEARE, losses, plan, read_metrics
from gpt.config.model import ModelConfig
from gpt.collectives.process_group import DistEnv
from gpt.model.transformer import GPT
from gpt.parallel.base import Strategy
from gpt.parallel.layout import ParallelDims
from gpt.train.trainer import Trainer
from gpt.config import schema

BASE = ["model=tiny", "train.max_steps=12", "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=0",
        "train.progress=false", "train.lr=3e-3", f"data.text_path={SHAKESPEARE}"]


@pytest.fixture
def train(tmp_path_factory):
    prepared = tmp_path_factory.getbasetemp() / "trainer-data"

    def run(*overrides: str):
        run_dir = plan(tmp_path_factory.mktemp("run"), *BASE, f"data.dir={prepared}", *overrides)
        summary = Trainer(schema.load(run_dir / "config.yaml"), DistEnv(), run_dir).fit()
        return run_dir, summary

    return run


def test_the_model_phase_of_the_start_up_is_timed_in_its_parts(tmp_path_factory):
    """model_s's parts (launch.run.startup.MODEL_PARTS), for the start-up line: where a requeue's seconds go."""
    run_dir = plan(tmp_path_factory.mktemp("run"), *BASE, f"data.dir={tmp_path_factory.getbasetemp() / 'trainer-data'}")
    startup = Trainer(schema.load(run_dir / "config.yaml"), DistEnv(), run_dir).startup
    parts = [startup["kernel_check_s"], startup["build_s"], startup["setup_s"]]
    assert min(parts) >= 0 and sum(parts) <= startup["model_s"]


def test_every_record_counts_the_steps_done_as_the_log_and_the_checkpoints_do(train, caplog):
    """The log's `step 2/4` is train record step 2, the validation after it shares that step, and so does their x in
    TensorBoard: train and validation curves line up."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with caplog.at_level("INFO", logger="gpt.train.reporter"):
        run_dir, _ = train("train.max_steps=4", "train.eval_interval=2", "train.progress=true")
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(run_dir, kind="val")] == [2, 4]
    run = schema.load(run_dir / "config.yaml")
    assert records[0]["tokens_seen"] == run.train.global_batch_size * run.model.block_size  # one step's
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 2/4: ")]
    assert logged == [f"step 2/4: loss {records[1]['loss']:.4f}, {records[1]['tokens_per_s']:,.0f} tokens/s"], logged
    board = EventAccumulator(str(run_dir / "tensorboard" / "rank0"))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in board.Scalars("val/loss")] == [2, 4]


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(train):
    whole, _ = train("train.global_batch_size=12")
    accumulated, _ = train("train.global_batch_size=12", "train.micro_batch_size=3")
    for a, b in zip(losses(whole), losses(accumulated), strict=True):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.slow
def test_mixed_precision_trains_close_to_fp32(train, precision):
    fp32, _ = train()
    mixed, _ = train(f"train.precision={precision}")
    a, b = losses(fp32), losses(mixed)
    assert b[-1] < b[0] - 0.3 and all(math.isfinite(x) for x in b)
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05  # low-precision matmuls drift a little, not a lot


@pytest.mark.slow
def test_learning_rate_warms_up_then_decays(train):
    run_dir, _ = train("train.max_steps=20", "train.warmup_steps=5", "train.min_lr=3e-4")
    lrs = [r["lr"] for r in read_metrics(run_dir)]
    assert lrs[0] == pytest.approx(3e-3 / 5) and lrs[4] == pytest.approx(3e-3)
    assert all(a > b for a, b in zip(lrs[5:], lrs[6:]))  # cosine decay towards min_lr, reached at max_steps
    assert 3e-4 < lrs[-1] < 3.5e-4


def test_gradient_clipping_scales_to_the_threshold_and_reports_the_norm_before():
    model = torch.nn.Linear(4, 3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    before = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    strategy = Strategy(None, DistEnv(), torch.device("cpu"), "fp32", ParallelDims())
    strategy.model = model
    reported = strategy.clip_gradients(0.5)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert reported == pytest.approx(before.item()) and after == pytest.approx(0.5, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_model_matches_eager(train, scope):
    """Each block compiled, or the whole model with its loss (Inductor fuses the head's cast and cross-entropy)."""
    eager, _ = train("train.max_steps=4")
    compiled, _ = train("train.max_steps=4", "train.compile=true", f"train.compile_scope={scope}")
    for a, b in zip(losses(eager), losses(compiled), strict=True):
        assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_logits_are_freed_before_backward(precision):
    """The step keeps only the loss: the (batch, block, vocabulary) logits, the largest activation of a small
    model, are not held while backward runs."""
    strategy = Strategy(None, DistEnv(), torch.device("cpu"), precision, ParallelDims())
    strategy.setup(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64)), 1e-3, 0.1,
                   (0.9, 0.99))
    logits, alive = [], []
    strategy.model.lm_head.register_forward_hook(lambda m, i, out: logits.append(weakref.ref(out)))
    strategy.model.ln_f.weight.register_hook(lambda g: alive.append(logits[-1]() is not None))  # in backward
    x = torch.randint(0, 64, (2, 8))
    strategy.train_step([(x, x)], 1, 1e-3, 1.0)
    assert alive == [False]
