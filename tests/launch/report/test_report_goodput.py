"""The report's Goodput section: per point in wall seconds, and for the sweep in node-seconds."""
from __future__ import annotations

from types import SimpleNamespace

from gpt.run_folder import RunFolder
from launch.report.markdown import goodput


def point(path, nodes: int, allocated_s: float, train_s: float) -> SimpleNamespace:
    path.mkdir()
    RunFolder(path).attempts.append(None, 0, {"first_step": 0, "last_step": 10, "ended": "finished", "goodput": {
        "allocated_s": allocated_s, "startup_s": 10.0, "train_s": train_s, "eval_s": 0.0, "save_s": 0.0,
        "steps": 10, "saves": 1}})
    return SimpleNamespace(name=f"nodes={nodes}", path=path, nodes=nodes)


def test_the_sweeps_goodput_weighs_each_point_by_its_nodes(tmp_path):
    """A 1-node point keeps 80 s of 100, a 4-node point 20 s of 100: by wall seconds 100 of 200 (50%), but the
    4-node point's allocation costs four times as much: 80 + 4 x 20 of 100 + 4 x 100 node-seconds, 32%."""
    rep = SimpleNamespace(points=[point(tmp_path / "a", 1, 100.0, 80.0), point(tmp_path / "b", 4, 100.0, 20.0)])
    text = goodput(rep)
    assert "| nodes=1 | 1 | 100.0 s | 80.0 s | 80.0% |" in text and "| nodes=4 | 1 | 100.0 s | 20.0 s | 20.0% |" in text
    sweep = text.splitlines()[-1]
    assert sweep.startswith("| **sweep** (node-seconds) | 2 | 500.0 node-s | 160.0 node-s | 32.0% | 50.0 node-s |"), \
        sweep
    assert "weighs each point by its nodes (node-seconds" in text
