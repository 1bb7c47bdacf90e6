"""The health verdict: a node below health.min_fraction of the median, or failing storage, is flagged."""
from __future__ import annotations

import torch

from gpt.health import NodeHealth, Verdict, bus_bandwidth_gbps, matmul_gflops, storage_problem


def test_a_slow_node_and_a_node_that_cannot_write_are_flagged():
    nodes = [NodeHealth(0, "a", [0], 50.0, None), NodeHealth(1, "b", [1], 20.0, None),
             NodeHealth(2, "c", [2], 48.0, None), NodeHealth(3, "d", [3], 52.0, "OSError: read-only")]
    verdict = Verdict(nodes, 0.8, bus_bandwidth_gbps(4, 1 << 20, 2.0))
    assert verdict.median == 49.0
    assert [n.host for n in verdict.flagged] == ["b", "d"]
    assert nodes[1].describe(verdict.median) == "node 1 (b, rank 1): 20.0 GFLOP/s, 0.41 of the median 49.0"
    assert verdict.summary() == "health: 4 node(s), matmul 20.0-52.0 GFLOP/s (median 49.0); all-reduce bus bandwidth 0.79 GB/s"


def test_storage_check_reads_back_what_it_wrote(tmp_path):
    assert storage_problem(tmp_path, "h-rank0") is None
    assert not list((tmp_path / "health").iterdir())  # it cleans up
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "health").write_text("a file where a folder should be")
    assert storage_problem(tmp_path / "ro", "h-rank0").startswith(("FileExistsError", "NotADirectoryError"))


def test_the_injected_slow_node_measures_slower():
    fast = max(matmul_gflops(64, torch.device("cpu"), torch.float32, seconds=0.05) for _ in range(3))
    slow = matmul_gflops(64, torch.device("cpu"), torch.float32, drag=3.0, seconds=0.05)
    assert slow < 0.6 * fast, (slow, fast)  # a third of its own speed: below any turn of the same machine
