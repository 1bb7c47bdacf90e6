"""A run's schedule in its identity (run.json): a longer cosine run is refused with the exact key that continues
it, and a wsd run extends from its stable phase with nothing, else is told which checkpoint to branch from."""
from __future__ import annotations

import json

import pytest

import launch.run.identity as identity_module
from launch import launch_config
from gpt.errors import UserError
from helpers import SHAKESPEARE, compose
from launch.rank.job_env import JobEnvironment
from gpt.data.inputs import corpus_of
from launch.run.identity import check_run_folder


def planned(tmp_path, *overrides: str):
    return launch_config.parse(compose("model=tiny", f"data.text_path={SHAKESPEARE}", f"data.dir={tmp_path / 'data'}",
                              "train.warmup_steps=2", *overrides))


def check(run, run_dir):
    return check_run_folder(run, corpus_of(run.data), run_dir, JobEnvironment({}))


def at_step(monkeypatch, step: int) -> None:
    monkeypatch.setattr(identity_module, "newest_step", lambda run_dir: step)


def test_a_longer_cosine_run_is_told_the_decay_steps_that_continue_it(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    check(planned(tmp_path, "train.max_steps=3000"), run_dir).record(run_dir)
    at_step(monkeypatch, 3000)
    with pytest.raises(UserError) as e:
        check(planned(tmp_path, "train.max_steps=3500"), run_dir)
    assert ("train.decay_steps (or max_steps): the run has 3000, this command 3500: add train.decay_steps=3000 to "
            "this command") in str(e.value)
    typed = check(planned(tmp_path, "train.max_steps=3500", "train.decay_steps=3000"), run_dir)
    assert typed.existing is not None and not typed.existing.finished  # what the hint says trains on


def test_a_refused_continuation_is_one_line_for_one_key_and_a_line_per_key_for_several(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    check(planned(tmp_path, "train.max_steps=3000"), run_dir).record(run_dir)
    at_step(monkeypatch, 3000)
    with pytest.raises(UserError) as one:
        check(planned(tmp_path, "train.max_steps=3000", "train.lr=0.01"), run_dir)
    assert str(one.value) == (f"{run_dir} holds a run with other settings (step 3000); it cannot continue with these: "
                              "train.lr: the run has 0.001, this command 0.01. Run it with its own settings, or start "
                              "a new run under another name (run=NAME).")
    with pytest.raises(UserError) as several:
        check(planned(tmp_path, "train.max_steps=3500", "train.lr=0.01"), run_dir)
    first, *keys = str(several.value).split("\n")
    assert first.endswith("Run it with its own settings, or start a new run under another name (run=NAME). The 2 "
                          "keys that differ:")
    assert [k.split(":")[0] for k in keys] == ["  train.decay_steps (or max_steps)", "  train.lr"]


def checkpoint(run_dir, step: int, index: int) -> None:
    """A whole checkpoint as the store lists it (meta.json and DCP's .metadata), nothing to load."""
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    (path / "meta.json").write_text(json.dumps({"step": step, "save_index": index}))


def test_a_wsd_run_extends_from_its_stable_phase_and_else_is_told_where_to_branch(tmp_path, monkeypatch):
    run_dir, wsd = tmp_path / "run", ("train.schedule=wsd", "train.decay_fraction=0.25")
    check(planned(tmp_path, *wsd, "train.max_steps=12"), run_dir).record(run_dir)
    for i, step in enumerate((4, 8, 12)):
        checkpoint(run_dir, step, i)
    at_step(monkeypatch, 8)  # stable (the decay starts at 9): a longer run needs nothing
    check(planned(tmp_path, *wsd, "train.max_steps=16"), run_dir)
    with pytest.raises(UserError) as e:  # its decay would start at 7, before the step taken
        check(planned(tmp_path, *wsd, "train.max_steps=9"), run_dir)
    assert "this decay would begin at step 7, before the run's step 8; train.max_steps=10 or more" in str(e.value)

    at_step(monkeypatch, 12)  # decayed: branch from the newest stable checkpoint into a new run
    with pytest.raises(UserError) as e:
        check(planned(tmp_path, *wsd, "train.max_steps=16"), run_dir)
    assert (f"its decay began at step 9 and it is at step 12; extend or anneal from a checkpoint of its stable "
            f"phase into a new run: resume={run_dir / 'checkpoints' / 'step_00000008'} run=NEW_NAME "
            "train.max_steps=M") in str(e.value)
    check(planned(tmp_path, *wsd, "train.max_steps=12"), run_dir)  # the same: fine
