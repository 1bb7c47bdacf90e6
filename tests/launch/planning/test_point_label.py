"""Sweep points are named by what varies across the sweep, short and safe as folder names."""
from __future__ import annotations

from launch.planning.labels import point_labels, varying_keys


def test_only_the_keys_that_vary_name_a_point():
    sweep = [["nodes=1", "strategy=ddp", "model=tiny"], ["nodes=2", "strategy=ddp", "model=tiny"]]
    assert varying_keys(sweep) == ["nodes"]
    assert point_labels(sweep) == ["nodes=1", "nodes=2"]


def test_several_varying_keys_and_unsafe_values():
    sweep = [["train.lr=0.001", "data.dir=/a/b"], ["train.lr=0.0003", "data.dir=/a/c"]]
    assert point_labels(sweep) == ["train.lr=0.001,data.dir=_a_b", "train.lr=0.0003,data.dir=_a_c"]


def test_a_one_point_sweep_has_no_varying_key():
    assert point_labels([["nodes=1", "model=tiny"]]) == [""]  # the launcher names it nodes=<its nodes>


def test_labels_are_unique_for_distinct_points():
    sweep = [[f"train.lr={lr}", f"nodes={n}"] for lr in (1e-3, 3e-4) for n in (1, 2)]
    labels = point_labels(sweep)
    assert len(set(labels)) == 4 and "train.lr=0.001,nodes=2" in labels


def test_a_swept_key_names_a_point_even_alone_in_its_batch():
    """A sweeper that chooses points from results launches them a batch (or one) at a time: the keys it sweeps name
    every point, whether or not they differ within the batch."""
    assert point_labels([["model=tiny", "train.lr=0.01"]]) == [""]
    assert point_labels([["model=tiny", "train.lr=0.01"]], swept=["train.lr"]) == ["train.lr=0.01"]
    assert point_labels([["nodes=1", "train.lr=0.1"], ["nodes=2", "train.lr=0.1"]], swept=["train.lr"]) == [
        "nodes=1,train.lr=0.1", "nodes=2,train.lr=0.1"]
