"""tests/helpers.compose keeps Hydra's composition of the config groups per choice of groups and sets the values on a
copy, by Hydra's own step for them: for every kind of override the suite uses, the config (or the error) is the one
Hydra's compose gives."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import helpers

CASES = [
    (),
    ("model=tiny", "model.n_layer=2", "train.max_steps=3"),
    ("train.max_steps=3", "model=tiny", "train=gpu", "train.max_steps=5"),  # values after the groups, in order
    ("cluster=srun", "strategy=ddp", "train.micro_batch_size=null", "preemption.signals=[SIGTERM,SIGUSR2]"),
    ("cluster=slurm", "+cluster.env.KEEP_N=1", "cluster.setup=['pip install \"$X\"']"),
    ("model=tiny", "nodes=2", "seed=7", "init=hf:gone"),  # top-level values, not groups
    ("train.max_stepz=3",),  # a key the config does not have
    ("train.max_steps=three",),  # a value of the wrong type
    ("model=nonesuch",),
    ("seed=1,2",),  # a sweep: the launcher's, not a compose's
]


def outcome(compose, overrides):
    try:
        return OmegaConf.to_yaml(compose(overrides))
    except Exception as e:  # noqa: BLE001 - the error itself is compared
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: " ".join(o) or "defaults")
def test_the_helpers_compose_is_hydras(overrides):
    assert outcome(lambda o: helpers.compose(*o), overrides) == outcome(helpers._hydra_compose, overrides)


def test_a_composed_config_changed_by_a_test_does_not_reach_the_next():
    first = helpers.compose("model=tiny", "train.max_steps=3")
    first.train.max_steps = 99
    assert helpers.compose("model=tiny", "train.max_steps=3").train.max_steps == 3
    assert helpers.compose("model=tiny").train.max_steps != 99


def test_a_site_folder_a_test_writes_is_read_by_each_compose(tmp_path, monkeypatch):
    """Hydra's search path then holds a folder of the test's (hydra_plugins/gptlaunch_site): nothing is kept."""
    monkeypatch.setenv(helpers.SITE_DIR, str(tmp_path))
    (tmp_path / "site").mkdir()
    for account in ("one", "two"):
        (tmp_path / "site" / "mysite.yaml").write_text(f"# @package _global_\ncluster:\n  account: {account}\n")
        assert helpers.compose("site=mysite").cluster.account == account


def test_a_strategy_a_test_registers_is_composed_as_it_is_now():
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    try:
        for name in ("ddp", "fsdp"):  # the same option registered again with another preset
            store.store(group="strategy", name="later", node={"strategy": {"name": name}}, package="_global_",
                        provider="test")
            assert helpers.compose("strategy=later").strategy.name == name
        store.repo["strategy"].pop("later.yaml")
        with pytest.raises(Exception, match="strategy/later"):
            helpers.compose("strategy=later")
    finally:
        store.repo["strategy"].pop("later.yaml", None)
