"""Each strategy's save_state/load_state round trip: a fresh trainer that loads the step-10 checkpoint trains
steps 10-19 with the losses of the uninterrupted run (model, optimizer state and, for DeepSpeed, its engine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import losses
from strategy_runs import COMMON, run

CASES = {
    "fsdp": ["strategy=fsdp"],
    "zero1": ["strategy=zero1"],
    "deepspeed_zero3": ["strategy=deepspeed", "strategy.stage=3"],
    "pipeline_1f1b": ["strategy=pipeline", "strategy.schedule=1f1b"],  # the tied head lives on stage 1
}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, data_overrides) -> Path:
    run("single", tmp_path_factory, data_overrides)  # prepares the data
    data_dir = next(o.split("=", 1)[1] for o in data_overrides if o.startswith("data.dir="))
    out = tmp_path_factory.mktemp("resume")
    common = [o for o in COMMON if not o.startswith("checkpoint.")] + ["train.progress=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).with_name("resume_worker.py")), str(out), data_dir, json.dumps(CASES),
           json.dumps(common)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


@pytest.mark.parametrize("name", CASES)
def test_resumed_run_repeats_the_uninterrupted_losses(name, resumed):
    full, again = losses(resumed / name / "full"), losses(resumed / name / "resumed")
    assert len(full) == 20 and len(again) == 10
    assert again == pytest.approx(full[10:], rel=1e-6, abs=0)
