"""What a run computes in, in its identity (run.json) and its checkpoints' fingerprint: the precision and, with fp8,
its scaling recipe must stay; the dtype gradients are reduced in may change between attempts, as the node count."""
from __future__ import annotations

import pytest

import launch.run.identity as identity_module
from gpt.errors import UserError
from launch.run.identity import check_run_folder
from launch.rank.job_env import JobEnvironment
from gpt.data.inputs import corpus_of
from test_schedule_identity import planned


def check(tmp_path, *overrides: str):
    run = planned(tmp_path, "strategy=fsdp", *overrides)
    return check_run_folder(run, corpus_of(run.data), tmp_path / "run", JobEnvironment({}))


@pytest.mark.parametrize("first, then, key", [
    (["train.precision=bf16"], ["train.precision=fp32"], "train.precision: the run has 'bf16', this command 'fp32'"),
    (["train.precision=fp8", "train.compile=true"], ["train.precision=fp8", "train.compile=true",
                                                      "train.fp8_recipe=rowwise"],
     "train.fp8_recipe: the run has 'tensorwise', this command 'rowwise'"),
])
def test_a_command_that_changes_what_the_run_computes_in_is_refused_naming_the_key(tmp_path, monkeypatch, first,
                                                                                     then, key):
    check(tmp_path, *first).record(tmp_path / "run")
    monkeypatch.setattr(identity_module, "newest_step", lambda run_dir: 10)
    with pytest.raises(UserError) as e:
        check(tmp_path, *then)
    assert key in str(e.value)


def test_the_reduce_dtype_may_change_and_a_recipe_is_no_part_of_a_run_without_fp8(tmp_path, monkeypatch):
    check(tmp_path, "train.precision=bf16").record(tmp_path / "run")
    monkeypatch.setattr(identity_module, "newest_step", lambda run_dir: 10)
    again = check(tmp_path, "train.precision=bf16", "train.reduce_dtype=bf16", "train.fp8_recipe=rowwise")
    assert again.existing is not None and again.existing.step == 10
    assert "train.fp8_recipe" not in again.identity["identity"] and "train.reduce_dtype" not in again.identity["identity"]
