"""The paths a run reads besides its data (eval.tasks, init=hf:PATH, resume=PATH) are made absolute and checked at
planning, once: any process reads the run's config.yaml from any folder, and a run that has a checkpoint of its own
no longer needs the folder it started from."""
from __future__ import annotations

import json

import pytest
import yaml

import launch.planning.plan as plan_module
from gpt.errors import ConfigError
from helpers import compose, plan
from launch import launch_config
from launch.backends.slurm import commands
from launch.cancel import cancel

TASK = {"ctx": "To be or", "endings": ["not", "yes"], "label": 0}


def config_yaml(run_dir, **changes) -> None:
    """A run folder's config.yaml holding `changes` (as an earlier version, or a later edit, left it): paths that
    do not resolve from here, or are gone."""
    run_dir.mkdir(parents=True, exist_ok=True)
    from gpt.config import schema

    schema.save(launch_config.parse(compose("model=tiny", "train.eval_interval=5")), run_dir / "config.yaml")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (saved[section] if section else saved)[name] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    (run_dir / "run.json").write_text("{}")


def test_reading_config_yaml_checks_no_path(tmp_path, monkeypatch):
    """Read from another folder, or after the init folder was purged: the config reads (each process that reads it
    would otherwise fail: a rank at a requeue, launch.cancel, launch.status)."""
    monkeypatch.chdir(tmp_path)
    config_yaml(tmp_path / "a", **{"eval.tasks": ["tasks/hellaswag.jsonl"], "init": f"hf:{tmp_path / 'purged'}"})
    config_yaml(tmp_path / "b", resume=str(tmp_path / "gone" / "step_00000010"))
    assert launch_config.load(tmp_path / "a" / "config.yaml").init == f"hf:{tmp_path / 'purged'}"
    assert launch_config.load(tmp_path / "b" / "config.yaml").resume.endswith("step_00000010")


def test_planning_makes_the_paths_absolute_and_checks_them_once(tmp_path, monkeypatch, prepared_data):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.jsonl").write_text(json.dumps(TASK) + "\n")
    run_dir = plan(tmp_path / "run", "model=tiny", "train.eval_interval=5", "eval.tasks=[tasks/t.jsonl]",
                   *prepared_data)
    assert launch_config.load(run_dir / "config.yaml").eval.tasks == [str(tmp_path / "tasks" / "t.jsonl")]
    with pytest.raises(ConfigError, match="^eval.tasks='.*absent.jsonl' is not valid: local files"):
        plan(tmp_path / "run2", "model=tiny", "train.eval_interval=5", "eval.tasks=[absent.jsonl]", *prepared_data)
    with pytest.raises(ConfigError, match="^resume='.*/gone' is not valid: auto, none, or an existing checkpoint"):
        plan(tmp_path / "run2", "model=tiny", "resume=gone", *prepared_data)
    with pytest.raises(ConfigError, match=f"^init='hf:{tmp_path}/purged' is not valid: none, or hf:PATH"):
        plan(tmp_path / "run2", "model=tiny", "init=hf:purged", *prepared_data)


def test_the_place_a_run_started_from_is_not_checked_once_it_has_its_own_checkpoint(tmp_path, monkeypatch,
                                                                                      prepared_data):
    """A requeue plans again (sbatch slurm/multi_node.sh): a purged init folder or resume checkpoint, which its ranks
    no longer read, must not stop it."""
    monkeypatch.setattr(plan_module, "newest_step", lambda run_dir: 10, raising=False)
    run_dir = plan(tmp_path / "run", "model=tiny", f"init=hf:{tmp_path / 'purged'}", *prepared_data)
    assert launch_config.load(run_dir / "config.yaml").init == f"hf:{tmp_path / 'purged'}"
    plan(tmp_path / "run2", "model=tiny", f"resume={tmp_path / 'gone'}", *prepared_data)


def slurm_answers(calls: list[tuple[str, ...]], scancel_fails: bool = False):
    """Job 5 runs; scancel does as asked, or fails as a controller that does not answer makes it."""
    def run(*cmd: str, **_) -> str:
        calls.append(cmd)
        if cmd[0] == "squeue":
            return "5|RUNNING|None\n"
        if cmd[0] == "scancel" and scancel_fails:
            raise commands.SlurmUnavailable(f"{' '.join(cmd)}: Command timed out after 60 seconds")
        if cmd[0] == "scancel":
            return ""
        raise AssertionError(f"nothing else is asked: {cmd}")
    return run


def running_run(path, **config):
    config_yaml(path, **config)
    (path / "slurm_job.json").write_text(json.dumps({"job_id": "5"}))
    return path


def test_cancel_from_another_folder_requests_and_signals(tmp_path, monkeypatch):
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(commands, "run", slurm_answers(calls))
    monkeypatch.chdir(tmp_path)
    # relative, as an earlier version wrote it: from the folder the run was launched in
    run_dir = running_run(tmp_path / "run", **{"eval.tasks": ["tasks/hellaswag.jsonl"]})
    assert cancel(run_dir, wait_s=0) == 0
    assert json.loads((run_dir / "cancel.json").read_text())["job_ids"] == ["5"]
    assert ("scancel", "--signal=USR2", "5") in calls


def test_cancel_takes_its_request_back_when_the_signal_fails(tmp_path, monkeypatch, capsys):
    """A request no signal follows would make the job's next preemption read as the user's cancel."""
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(commands, "run", slurm_answers(calls, scancel_fails=True))
    run_dir = running_run(tmp_path / "run")
    assert cancel(run_dir, wait_s=0) == 1
    assert not (run_dir / "cancel.json").exists()
    assert ("scancel", "--signal=USR2", "5") in calls
    assert "error: Slurm does not answer (scancel --signal=USR2 5: " in capsys.readouterr().err
