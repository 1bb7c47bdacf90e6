"""Dropout under tensor parallelism, with each rank's dropout generator seeded as a GPU's is (on the CPU too): the
ranks of a tensor-parallel group drop the same elements of the activations they share, so their replicated norm
weights stay equal; data-parallel replicas draw masks of their own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from strategy_runs import GQA, run

TP = 2
OVERRIDES = ["model=tiny", *GQA, "model.dropout=0.2", "strategy=fsdp", f"parallel.tp={TP}",
             "cluster.tasks_per_node=4", "train.device=cpu", "train.max_steps=4", "train.warmup_steps=1",
             "train.lr=3e-3", "train.global_batch_size=8", "train.log_interval=2", "train.eval_interval=0",
             "train.progress=false", "checkpoint.interval_steps=0"]


@pytest.mark.slow
def test_tensor_parallel_ranks_keep_replicated_weights_equal_under_dropout(tmp_path_factory, data_overrides):
    run("single", tmp_path_factory, data_overrides)  # prepares the data
    data_dir = next(o.split("=", 1)[1] for o in data_overrides if o.startswith("data.dir="))
    out = tmp_path_factory.mktemp("tp_dropout") / "ranks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(Path(__file__).with_name("dropout_worker.py")), str(out), data_dir, json.dumps(OVERRIDES)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == 4 and ranks[0]["norms"]
    for first in range(0, 4, TP):  # tp is the innermost axis: ranks 0-1 and 2-3 are the tensor-parallel groups
        group = ranks[first:first + TP]
        for name, value in group[0]["norms"].items():
            assert group[1]["norms"][name] == value, name  # bitwise: the same inputs, the same masks
        assert group[0]["rng"] == group[1]["rng"]  # one dropout stream per group
    assert ranks[0]["rng"] != ranks[2]["rng"]  # the two data-parallel replicas draw their own masks
    trained = [v for rank in ranks for values in rank["norms"].values() for v in values]
    assert any(v != 1.0 for v in trained)  # the norms moved from their initial ones: the comparison is not vacuous
