"""The checkpoint a run will load is checked against its strategy and world size at planning: a format the
strategy cannot load, or DeepSpeed's files on another number of ranks, are refused in one line before anything is
submitted, not by the ranks once the job has waited in the queue."""
from __future__ import annotations

import dataclasses
import json

import pytest

from gpt.errors import UserError
from helpers import SHAKESPEARE, compose, make_plan_of
from launch import launch_config


def checkpoint(run_dir, step: int, **meta) -> None:
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    (path / "meta.json").write_text(json.dumps({"step": step, **meta}))


def plan(tmp_path, run_dir, *overrides: str):
    run = launch_config.parse(compose("model=tiny", f"data.text_path={SHAKESPEARE}", f"data.dir={tmp_path / 'data'}",
                                      *overrides))
    return make_plan_of(run, run_dir)


@pytest.mark.parametrize("meta, overrides, refusal", [
    ({"strategy": "zero1", "checkpoint_format": "dcp", "world_size": 2}, ["strategy=deepspeed", "nodes=2"],
     "written by strategy=zero1 in the dcp format, which does not load into strategy=deepspeed"),
    ({"strategy": "deepspeed", "checkpoint_format": "deepspeed", "world_size": 2}, ["strategy=fsdp", "nodes=2"],
     "in the deepspeed format, which does not load into strategy=fsdp"),
    ({"strategy": "deepspeed", "checkpoint_format": "deepspeed", "world_size": 2}, ["strategy=deepspeed"],
     "on 2 ranks and this run has 1: its deepspeed checkpoints cannot be resharded"),
])
def test_a_checkpoint_the_layout_cannot_load_is_refused_before_submission(tmp_path, meta, overrides, refusal):
    checkpoint(tmp_path / "run", 5, **meta)
    with pytest.raises(UserError, match=refusal):
        plan(tmp_path, tmp_path / "run", *overrides)
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("saved, asked, loads", [(2, 3, "1 or 2"), (3, 2, "3"), (1, 3, "1 or 2"), (0, 1, "0")])
def test_a_zero_stage_its_deepspeed_checkpoint_does_not_load_into_is_refused_naming_both(tmp_path, saved, asked,
                                                                                          loads):
    checkpoint(tmp_path / "run", 5, strategy="deepspeed", checkpoint_format="deepspeed", world_size=2,
               strategy_keys={"stage": saved})
    with pytest.raises(UserError, match=rf"written with strategy.stage={saved} and this run asks for "
                                        rf"strategy.stage={asked}: .* continue with strategy.stage={loads} ") as e:
        plan(tmp_path, tmp_path / "run", "strategy=deepspeed", f"strategy.stage={asked}", "nodes=2")
    assert "\n" not in str(e.value)


def test_zero_1_and_2_continue_each_other_and_an_unrecorded_stage_is_left_to_the_ranks(tmp_path):
    checkpoint(tmp_path / "run", 5, strategy="deepspeed", checkpoint_format="deepspeed", world_size=2,
               strategy_keys={"stage": 2})
    plan(tmp_path, tmp_path / "run", "strategy=deepspeed", "strategy.stage=1", "nodes=2")
    checkpoint(tmp_path / "old", 5, strategy="deepspeed", checkpoint_format="deepspeed", world_size=2)
    plan(tmp_path, tmp_path / "old", "strategy=deepspeed", "strategy.stage=3", "nodes=2")


def test_one_it_loads_plans_and_so_does_another_runs_named_by_resume(tmp_path):
    checkpoint(tmp_path / "run", 5, strategy="deepspeed", checkpoint_format="deepspeed", world_size=2)
    plan(tmp_path, tmp_path / "run", "strategy=deepspeed", "nodes=2")
    checkpoint(tmp_path / "other", 5, strategy="ddp", checkpoint_format="dcp", world_size=4)
    plan(tmp_path, tmp_path / "fresh", "strategy=fsdp", f"resume={tmp_path / 'other'}")  # DCP reshards
    with pytest.raises(UserError, match="in the dcp format, which does not load into strategy=deepspeed"):
        plan(tmp_path, tmp_path / "new", "strategy=deepspeed", f"resume={tmp_path / 'other'}")
    (tmp_path / "run" / "checkpoints" / "step_00000005" / "meta.json").write_text("{")
    plan(tmp_path, tmp_path / "run", "strategy=fsdp")  # unreadable: left to the ranks, which fall back


def test_another_runs_checkpoint_of_another_model_is_refused_naming_the_keys(tmp_path):
    run = launch_config.parse(compose("model=tiny", "model.n_embd=64", "model.vocab_size=65"))
    model = {f"model.{k}": v for k, v in dataclasses.asdict(run.model).items()}  # as a rank's fingerprint has it
    checkpoint(tmp_path / "other", 5, strategy="ddp", checkpoint_format="dcp", world_size=1, fingerprint=model)
    with pytest.raises(UserError, match=r"mismatching keys:\n  model.n_embd: checkpoint 64, this run 128\n[^ ]"):
        plan(tmp_path, tmp_path / "fresh", "model.n_embd=128", f"resume={tmp_path / 'other'}")
    plan(tmp_path, tmp_path / "fresh", "model.n_embd=64", "train.lr=1",
         f"resume={tmp_path / 'other'}")  # the model alone must match: a schedule of its own starts from it
