"""The config is one typed tree (launch.launch_config.LaunchConfig: gpt.config.schema.RunConfig with the
launcher's sections), checked before anything runs: one line naming the key, the value and what is valid, whether
Hydra refuses it while composing (the schema) or the tree's sections do."""
from __future__ import annotations

import dataclasses
import re
import typing

import pytest
from hydra.errors import ConfigCompositionException

from gpt.config.schema import field_at
from launch import launch_config
from launch.launch_config import LaunchConfig, valid_for
from gpt.config.parse import section, to_plain
from gpt.config.sections import (CheckpointConfig, DebugConfig, HealthConfig, PreemptionConfig, StragglerConfig,
                                 WatchdogConfig)
from gpt.errors import ConfigError
from helpers import compose, launch, spread

BAD = {
    "checkpoint.keep=0": "checkpoint.keep=0 is not valid: a positive number of checkpoints to keep",
    "checkpoint.interval_minutes=-1": "checkpoint.interval_minutes=-1 is not valid",
    "+checkpoint.every=3": "checkpoint.every=3 is not valid: known checkpoint keys are async, crc32, final_dtype",
    "preemption.signals=[SIGKILL]": "preemption.signals='SIGKILL' is not valid",
    "preemption.max_restarts=-2": "preemption.max_restarts=-2 is not valid: an integer >= 0",
    "+preemption.retries=3": "preemption.retries=3 is not valid: known preemption keys are",
    "rendezvous.timeout_s=0": "rendezvous.timeout_s=0 is not valid",
    "debug.delay_rank=-1": "debug.delay_rank=-1 is not valid",
    "debug.signal_name=SIGFOO": "debug.signal_name='SIGFOO' is not valid",
    "+debug.hang=1": "debug.hang=1 is not valid: known debug keys are",
    "debug.hang_step=-3": "debug.hang_step=-3 is not valid",
    "watchdog.step_s=fast": "watchdog.step_s='fast' is not valid: a positive number of seconds, or auto",
    "watchdog.startup_s=0": "watchdog.startup_s=0 is not valid: a positive number of seconds",
    "watchdog.step_factor=0.5": "watchdog.step_factor=0.5 is not valid: a factor >= 1",
    "+watchdog.timeout=3": "watchdog.timeout=3 is not valid: known watchdog keys are",
    "health.action=drop": "health.action='drop' is not valid: warn or exclude",
    "health.min_fraction=1.5": "health.min_fraction=1.5 is not valid: a fraction between 0 and 1",
    "health.rounds=0": "health.rounds=0 is not valid: a number of rounds >= 1",
    "train.lr=-1": "train.lr=-1 is not valid: a positive learning rate",
    "train.min_lr=0.1": "train.min_lr=0.1 is not valid: between 0 and train.lr=0.001",
    "train.attention=xformers": "train.attention='xformers' is not valid: one of auto, flash, cudnn, efficient, math",
    "train.compile_mode=fast": "train.compile_mode='fast' is not valid: one of default, reduce-overhead, max-autotune",
    "train.compile_scope=head": "train.compile_scope='head' is not valid: one of blocks, model, auto",
    "train.micro_batch_size=most": "train.micro_batch_size='most' is not valid: a positive integer, null (the "
                                   "per-rank batch) or auto",
    "stragglers.windows=0": "stragglers.windows=0 is not valid: must be >= 1",
    "stragglers.action=drop": "stragglers.action='drop' is not valid: must be warn or exclude",
    "report.predict_nodes=[]": "report.predict_nodes=[] is not valid: a list of positive node counts",
    "budget.applies_to=best": "budget.applies_to='best' is not valid: one of worst, expected",
    "budget.max_node_hours=0": "budget.max_node_hours=0 is not valid: a positive number of node-hours",
    "parallel.tp=0": "parallel.tp=0 is not valid: a positive integer, or -1",
    "eval.after_save=always": "eval.after_save='always' is not valid: none or job",
    "strategy.stage=9": "strategy.stage=9 is not valid: strategy=single reads name (strategy.stage is for "
                        "strategy=deepspeed)",
    "cluster.partition=gpu": "cluster.partition='gpu' is not valid: cluster=local reads gpu_memory_gb, name, signal_delay_s, "
                             "tasks_per_node",
    "cluster.chain=3": "cluster.chain=3 is not valid: cluster=local reads gpu_memory_gb, name, signal_delay_s, tasks_per_node "
                       "(cluster.chain is for cluster=slurm)",
}
# An unknown key in every section, as a user types it: Hydra refuses it against the schema.
SECTIONS = [name for name, tp in typing.get_type_hints(LaunchConfig).items() if dataclasses.is_dataclass(tp)]


@pytest.mark.parametrize("override", spread("override", BAD, 10))
def test_bad_values_name_key_value_and_valid(override):
    with pytest.raises(ConfigError) as e:
        launch_config.parse(compose(override))
    assert BAD[override] in str(e.value)


@pytest.mark.parametrize("name", SECTIONS)
@pytest.mark.slow
def test_an_unknown_key_in_any_section_is_refused(name):
    with pytest.raises(ConfigCompositionException):  # Hydra, against the schema
        compose(f"{name}.foo=1")
    with pytest.raises(ConfigError, match=f"^{name}.foo=1 is not valid: known {name} keys are "):  # +key: the tree
        launch_config.parse(compose(f"+{name}.foo=1"))


@pytest.mark.parametrize("override,valid", [("train.lr=abc", "a number"), ("checkpoint.keep=abc", "an integer"),
                                            ("health.enabled=maybe", "true or false"), ("train.betas=[1,x]", "")])
def test_a_wrong_type_is_refused_by_hydra(override, valid):
    with pytest.raises(ConfigCompositionException):
        compose(override)
    assert valid in valid_for(override.split("=")[0])


def test_the_tree_knows_every_key_and_its_type():
    assert field_at("train.lr") is float and field_at("checkpoint.async") is bool
    assert field_at("stragglers.windows") is int and field_at("train.nope") is None
    assert valid_for("train.nope").startswith("known train keys are activation_checkpointing, attention, betas")
    assert valid_for("train.betas[1]") == "a number"
    assert valid_for("nope").startswith("known top-level keys are budget, checkpoint, cluster")


def test_defaults_live_in_the_dataclasses():
    run = launch_config.parse(compose())
    assert run.checkpoint == CheckpointConfig(500, None, 3, False)
    assert run.preemption == PreemptionConfig() and run.preemption.signals == ("SIGTERM", "SIGUSR2")
    assert run.debug == DebugConfig() and run.watchdog == WatchdogConfig() and run.health == HealthConfig()
    assert run.stragglers == StragglerConfig()
    assert run.cluster.name == "local" and run.nodes == 1
    assert run.strategy.name == "single" and run.name == "shakespeare_cpu-single"


def test_keys_with_other_names_in_the_config():
    run = launch_config.parse(compose("checkpoint.async=true", "stragglers.threshold_pct=35", "preemption.signals=[TERM]"))
    assert run.checkpoint.async_save and run.stragglers.threshold_pct == 35
    assert run.preemption.signals == ("SIGTERM",)
    plain = to_plain(run)
    assert plain["checkpoint"]["async"] is True and plain["stragglers"]["threshold_pct"] == 35
    assert launch_config.parse(plain) == run  # what a run folder's config.yaml holds reads back as the same tree


def test_a_section_from_plain_values():
    assert section(StragglerConfig, "stragglers", {"windows": 5, "top_k": 1}) == StragglerConfig(windows=5, top_k=1)
    with pytest.raises(ConfigError, match="stragglers.windows='5' is not valid: an integer"):
        section(StragglerConfig, "stragglers", {"windows": "5"})
    with pytest.raises(ConfigError, match=r"train.betas=\[0.9, 'x'\] is not valid: a list of numbers"):
        launch_config.parse({**to_plain(launch_config.parse(compose())), "train": {"betas": [0.9, "x"]}})


def test_process_group_timeout_follows_the_watchdog():
    assert WatchdogConfig().process_group_timeout() == 660  # the longest default budget (startup, save) + 60 s
    assert WatchdogConfig(startup_s=30, save_s=40, eval_s=20, step_s=90).process_group_timeout() == 150
    assert WatchdogConfig(enabled=False).process_group_timeout() == 600
    assert WatchdogConfig(collective_timeout_s=77).process_group_timeout() == 77


@pytest.mark.slow
def test_a_bad_value_stops_the_launch_before_any_rank(tmp_path, data_overrides):
    proc = launch("model=tiny", "checkpoint.keep=0", *data_overrides, run_dir=tmp_path / "run", check=False)
    assert proc.returncode == 2 and "error: checkpoint.keep=0 is not valid" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "logs").exists()


def test_the_run_config_is_written_atomically_and_once(tmp_path):
    """Under the stock launcher every task of a job writes config.yaml while others read it: a reader sees the old
    file or the new one, never a truncated one (a new file replaces it), and the same config is not written again."""
    from gpt.config import schema

    path, run = tmp_path / "config.yaml", launch_config.parse(compose())
    schema.save(run, path)
    first = path.stat().st_ino
    schema.save(run, path)
    assert path.stat().st_ino == first  # the same config: left as it is
    schema.save(dataclasses.replace(run, seed=run.seed + 1), path)
    assert path.stat().st_ino != first and schema.load(path).seed == run.seed + 1  # replaced, not rewritten in place
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left


def test_a_run_folder_config_is_parsed_once_per_process_and_fails_in_one_line(tmp_path, monkeypatch):
    """Every process outside planning (the task wrapper, srun's launcher, the login-node commands) reads config.yaml
    through schema.load: parsed once while the file stays the same, again once a launch replaced it, and a file that
    cannot be read is one UserError naming it and what is wrong, whoever asked."""
    from gpt.config import schema
    from gpt.errors import UserError

    path, run = tmp_path / "config.yaml", launch_config.parse(compose())
    schema.save(run, path)
    parsed = []
    real = schema.run_config
    monkeypatch.setattr(schema, "run_config", lambda cfg, root: parsed.append(cfg) or real(cfg, root))
    assert launch_config.load(path) is launch_config.load(path) and len(parsed) == 1
    schema.save(dataclasses.replace(run, seed=run.seed + 1), path)
    assert launch_config.load(path).seed == run.seed + 1 and len(parsed) == 2
    assert type(schema.load(path)) is schema.RunConfig and len(parsed) == 3  # gpt's own tree: no cluster section
    bad_value = re.sub(r"max_steps: \d+", "max_steps: many", path.read_text())
    for text, what in (("train: [unclosed", "not YAML"), (bad_value, "train.max_steps"), (None, "No such file")):
        if text is None:
            path.unlink()
        else:
            path.write_text(text)
        with pytest.raises(UserError) as e:
            schema.load(path)
        assert str(path) in str(e.value) and what in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_straggler_settings_are_a_section_of_their_own_and_the_old_keys_say_so(tmp_path):
    """One key per knob: metrics.straggler_windows is stragglers.windows. An old command gets one line naming the new
    key; a run folder's config.yaml written before the move still reads, with its values in the new keys."""
    import yaml

    from gpt.config import schema
    from launch.hydra_errors import user_error

    with pytest.raises(ConfigCompositionException) as composing:
        compose("metrics.straggler_windows=5")
    assert str(user_error(composing.value, ["metrics.straggler_windows=5"])) == (
        "metrics.straggler_windows=5 is not valid: use stragglers.KEY (metrics.straggler_windows is "
        "stragglers.windows) instead")
    old = to_plain(launch_config.parse(compose()))
    del old["stragglers"]
    old["metrics"] = {"straggler_windows": 7, "straggler_action": "exclude", "top_k": 2}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert launch_config.load(tmp_path / "config.yaml").stragglers == StragglerConfig(windows=7, action="exclude",
                                                                                       top_k=2)
    assert schema.moved_keys_in_place({"metrics": {"straggler_ema_alpha": 0.5}}) == {"stragglers": {"ema_alpha": 0.5}}


MOVED_NOW = {
    "cluster.nodes=2": "cluster.nodes=2 is not valid: use nodes (the run's node count: -m nodes=1,2,4; cluster=srun: "
                       "auto) instead",
    **{f"launcher.{key}={value}": f"launcher.{key}={value.capitalize()} is not valid: use hydra.launcher.{key} (the "
       "launcher's own section) instead" for key, value in (("detach", "true"), ("snapshot", "false"), ("pack", "true"))},
}


@pytest.mark.parametrize("old", MOVED_NOW)
def test_the_node_count_is_one_key_and_the_launchers_settings_are_its_section_and_the_old_keys_say_so(old):
    """One key per knob: the node count is `nodes` (cluster.nodes took it), and detach, snapshot and pack are the
    launcher's own section's (hydra.launcher, beside poll_s and progress). An old command gets one line naming the
    new key, and the new key is the one read."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from launch.hydra_errors import user_error
    from launch.launcher_section import launcher_section
    from helpers import REPO

    with pytest.raises(ConfigCompositionException) as composing:
        compose(old)
    assert str(user_error(composing.value, [old])) == MOVED_NOW[old]
    key, value = old.split("=")
    if key == "cluster.nodes":
        assert launch_config.parse(compose("nodes=2", "cluster=slurm")).nodes == 2
        return
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"hydra.{old}"], return_hydra_config=True)
    assert getattr(launcher_section(cfg.hydra.launcher), key.split(".")[1]) is (value == "true")

def test_a_run_folder_saved_before_the_node_count_and_the_launchers_settings_moved_still_reads(tmp_path):
    """config.yaml written with cluster.nodes (srun's resolved count, while the top-level `nodes` kept its default)
    and launcher.detach/snapshot/pack reads with the count in `nodes` and without the launcher's settings, for the
    launcher, the ranks and the report."""
    import yaml

    from gpt.config import schema
    from launch.report.points import load_yaml

    old = to_plain(launch_config.parse(compose()))
    old["cluster"]["nodes"] = 4
    old["launcher"].update(detach=True, snapshot=False, pack=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert launch_config.load(tmp_path / "config.yaml").nodes == 4
    assert schema.load(tmp_path / "config.yaml").launcher == launch_config.parse(compose()).launcher
    assert load_yaml(tmp_path / "config.yaml")["nodes"] == 4 and "nodes" not in load_yaml(tmp_path / "config.yaml")[
        "cluster"]
