"""One registry of strategies (gpt.parallel.traits.REGISTRY): a strategy registers its name, its implementation,
the strategy.* keys it reads and what its preset sets in one traits class, and that alone makes it selectable
(strategy=NAME), planned, built and listed wherever a strategy's name is valid. A new strategy is its module and its
traits class (and its row in docs/strategies.md)."""
from __future__ import annotations

import re

import pytest
from hydra.core.config_store import ConfigStore

from launch import launch_config
from gpt.config.schema import config_plain
from gpt.errors import ConfigError
from gpt.parallel import plan_layout, strategy_class
from gpt.parallel.base import Strategy
from gpt.parallel.ddp import DDP
from gpt.parallel.layout import ParallelDims
from gpt.parallel.traits import REGISTRY, DDPTraits, register, traits_of
from helpers import REPO, compose


class Toy(DDP):
    """A strategy no file of the project names."""


class ToyTraits(DDPTraits):
    name = "toy"
    implementation = f"{__name__}:Toy"
    keys = ("bucket_cap_mb",)


@pytest.fixture
def toy():
    """ToyTraits registered as a strategy would register itself, and gone again after the test."""
    register(ToyTraits)
    launch_config.register()  # what the app does at start-up: the registry's options in Hydra's ConfigStore
    yield
    del REGISTRY["toy"]
    ConfigStore.instance().repo["strategy"].pop("toy.yaml")


def test_a_registered_strategy_is_selectable_planned_built_and_listed(toy):
    run = launch_config.parse(compose("model=tiny", "strategy=toy", "strategy.bucket_cap_mb=5", "cluster.tasks_per_node=2"))
    assert run.strategy.name == "toy" and run.name == "tiny-toy"
    assert plan_layout(run.strategy, run.parallel, run.model, 2, 2, run.train) == ParallelDims(dp_replicate=2)
    assert strategy_class("toy") is Toy
    assert config_plain(run)["strategy"] == {"name": "toy", "bucket_cap_mb": 5.0}  # the keys it reads, written
    with pytest.raises(ConfigError, match=r"strategy.stage=3 is not valid: strategy=toy reads bucket_cap_mb, name"):
        launch_config.parse(compose("model=tiny", "strategy=toy", "strategy.stage=3"))
    with pytest.raises(ConfigError, match=r"one of .*pipeline, toy"):
        traits_of("nope")


@pytest.mark.slow
def test_the_registry_is_the_one_list_of_strategies():
    for name, traits in REGISTRY.items():
        assert issubclass(strategy_class(name), Strategy), name
        assert launch_config.parse(compose("model=tiny", f"strategy={name}", "cluster.tasks_per_node=2")).strategy.name == name
        assert type(traits).__name__.endswith("Traits"), "a traits class is never named like its strategy class"
    assert not (REPO / "configs" / "strategy").exists()  # the registry stores the strategy=NAME options
    table = (REPO / "docs" / "strategies.md").read_text().split("## ")[0]
    assert sorted(re.findall(r"^\| `(\w+)` \|", table, re.M)) == sorted(REGISTRY)  # each strategy documented
