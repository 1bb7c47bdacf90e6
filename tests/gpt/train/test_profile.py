"""What a rank shows of its steps: a profiler trace of the steps profile.steps names, and what it holds in memory,
by part, measured in its first step (in one process; the GPU-only snapshot path is in tests/gpt/test_cuda_contract)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from helpers import SHAKESPEARE, plan, read_metrics
from gpt.config import schema
from gpt.config.model import ModelConfig
from gpt.collectives.process_group import DistEnv
from gpt.model.flops import param_count
from gpt.model.transformer import GPT
from gpt.parallel.base import Strategy
from gpt.parallel.layout import ParallelDims
from gpt.parallel.memory_held import MeasuredStep
from gpt.train.build import model_config
from gpt.train.trainer import Trainer

MIB = 2**20


@pytest.mark.slow
def test_a_trace_of_two_steps_and_the_memory_held_by_part(tmp_path_factory):
    """profile.steps=1-2: one Chrome trace (JSON) with both steps and their ops, under the attempt's folder; the
    memory record: parameters, gradients and AdamW state exactly those of the model's fp32 tensors."""
    prepared = tmp_path_factory.getbasetemp() / "trainer-data"
    run_dir = plan(tmp_path_factory.mktemp("run"), "model=tiny", "train.max_steps=3", "train.eval_interval=0",
                   "train.progress=false", f"data.text_path={SHAKESPEARE}", f"data.dir={prepared}",
                   "profile.steps=1-2", "profile.record_shapes=true")
    run = schema.load(run_dir / "config.yaml")
    Trainer(run, DistEnv(), run_dir, attempt=3).fit()

    traces = sorted((run_dir / "profiles").rglob("*.json"))
    assert traces == [run_dir / "profiles" / "attempt-3" / "rank0.pt.trace.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert {"train step 1", "train step 2"} <= names and "train step 0" not in names
    assert "aten::mm" in names or "aten::addmm" in names
    assert any(e.get("args", {}).get("Input Dims") for e in events)  # record_shapes

    [memory] = read_metrics(run_dir, kind="memory")
    cfg = model_config(run.model, Path(run.data.dir))
    n, tensors = param_count(cfg)["total"], len(list(GPT(cfg).parameters()))
    assert memory["step"] == 1  # once the first step is done
    assert memory["mem/params_gib"] * 2**30 == 4 * n and memory["mem/grads_gib"] * 2**30 == 4 * n
    assert memory["mem/optimizer_gib"] * 2**30 == 8 * n + 4 * tensors  # two fp32 moments, a step count each


@pytest.mark.parametrize("attention", ["auto", "math"])
def test_activations_are_what_torchs_memory_tracker_sees_within_15_percent(attention):
    """The tensors autograd saves for backward, against torch's MemTracker (its ACT peak)."""
    from gpt.model import attention as kernels

    strategy = Strategy(None, DistEnv(), torch.device("cpu"), "fp32", ParallelDims())
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=65))
    for block in model.layers.values():
        block.attn.kernels = kernels.backends(attention)
    strategy.setup(model, 1e-3, 0.1, (0.9, 0.99))
    x = torch.randint(0, 65, (4, 64))
    with MeasuredStep(strategy, 1) as measured:
        strategy.train_step([(x, x)], 1, 1e-3, 1.0)
    held = measured.parts
    tracker = MemTracker()
    tracker.track_external(strategy.model, strategy.optimizer)
    with tracker:
        strategy.train_step([(x, x)], 1, 1e-3, 1.0)
    [peaks] = tracker.get_tracker_snapshot("peak").values()
    act = next(v for k, v in peaks.items() if str(k).endswith("ACT"))
    assert act > MIB and held.activations == pytest.approx(act, rel=0.15)
