"""checkpoint.final_model_only: a finished run's final checkpoint holds the weights alone (in bf16 if asked), which
export and evaluation load; continued past its max_steps, the run resumes from the newest checkpoint that holds its
optimizer state, which retention keeps."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import REPO, SHAKESPEARE, make_plan_of
from gpt.checkpoint.store import list_checkpoints
from gpt.checkpoint.writer import load_model
from gpt.collectives.process_group import DistEnv
from gpt.config import schema
from gpt.errors import ConfigError
from gpt.train.trainer import Trainer
from launch import launch_config

BASE = ["model=tiny", "train.warmup_steps=1", "train.decay_steps=5", "train.eval_interval=0", "train.progress=false",
        f"data.text_path={SHAKESPEARE}", "checkpoint.interval_steps=2", "checkpoint.keep=1",
        "checkpoint.final_model_only=true", "checkpoint.final_dtype=bf16"]


@pytest.fixture
def data(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "resilience-data"  # prepared once, as the resilience tests' own


def trainer(run_dir, data, *overrides: str) -> Trainer:
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[*BASE, f"data.dir={data}", *overrides])
    make_plan_of(launch_config.parse(cfg), run_dir)
    return Trainer(schema.load(run_dir / "config.yaml"), DistEnv(), run_dir)


@pytest.mark.slow
def test_a_finished_run_keeps_its_weights_alone_and_goes_on_from_its_newest_full_checkpoint(tmp_path, data, caplog):
    run_dir = tmp_path / "run"
    trainer(run_dir, data, "train.max_steps=5").fit()
    names = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    assert names == ["step_00000004", "step_00000005"], names  # keep=1, and the newest full one beside the weights
    final = run_dir / "checkpoints" / "step_00000005"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["model_only"] == "bf16" and not (final / "ranks").exists()
    model, _, _ = load_model(run_dir)  # what export, evaluate and generate read
    assert all(torch.equal(p, p.bfloat16().float()) for p in model.parameters())  # bf16 values
    caplog.set_level(logging.INFO)
    t = trainer(run_dir, data, "train.max_steps=7")
    assert t.step == 4 and ("step_00000005 holds the weights alone (checkpoint.final_model_only): resuming from "
                            "step_00000004, the newest checkpoint that holds its optimizer state") in caplog.text


@pytest.mark.slow
def test_more_steps_from_the_weights_alone_are_refused_at_planning(tmp_path, data):
    from gpt.errors import UserError

    run_dir = tmp_path / "run"
    trainer(run_dir, data, "train.max_steps=3", "checkpoint.interval_steps=0").fit()
    alone = run_dir / "checkpoints" / "step_00000003"
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [alone.name]
    with pytest.raises(UserError, match=rf"^train.max_steps=5: {alone} holds the weights alone .*export them "
                                        rf"\(python -m gpt.export {alone} DIR\) and start a new run with init=hf:DIR"):
        trainer(run_dir, data, "train.max_steps=5", "checkpoint.interval_steps=0")
    assert "max_steps: 3" in (run_dir / "config.yaml").read_text()  # refused before the folder's config changed


def test_bf16_alone_is_refused_with_its_optimizer(tmp_path, data):
    with pytest.raises(ConfigError, match="checkpoint.final_dtype"):
        trainer(tmp_path / "run", data, "checkpoint.final_model_only=false")


def fake_checkpoint(run_dir, step: int, model_only: bool = False):
    """A whole checkpoint as the store lists it (meta.json and DCP's .metadata), nothing to load."""
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    (path / "meta.json").write_text(json.dumps({"step": step, **({"model_only": "bf16"} if model_only else {})}))
    return path


def test_resume_path_at_weights_alone_is_refused_at_planning_and_a_run_folder_gives_its_newest_full(tmp_path):
    from gpt.checkpoint.store import resumable
    from gpt.errors import UserError
    from helpers import plan

    other = tmp_path / "other"
    full, alone = fake_checkpoint(other, 4), fake_checkpoint(other, 5, model_only=True)
    assert resumable(other) == full and resumable(full) == full  # a run folder: the newest that continues
    with pytest.raises(UserError, match=rf"resume={alone}: {alone} holds the weights alone .*export them "
                                        rf"\(python -m gpt.export {alone} DIR\) and start a new run with init=hf:DIR"):
        plan(tmp_path / "run", *BASE, f"data.dir={tmp_path / 'data'}", f"resume={alone}")
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything was written
    (full / "meta.json").write_text(json.dumps({"step": 4, "model_only": "fp32"}))
    with pytest.raises(UserError, match="holds the weights alone"):
        resumable(other)  # nothing in the folder continues
