"""benchmarks/gpu_smoke.py without a GPU: every row plans for 8 GPUs under --dry-run, and the harness itself (a row's
run, its check of the run folder, the table) works, shown on CPU rows that mirror its GPU rows."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from benchmarks.gpu_smoke import ROWS, Row, command, plan_error, run_row, table
from helpers import REPO

ON_CPU = ("train.device=cpu", "train.precision=fp32", "checkpoint.async=false")


@pytest.mark.slow
def test_every_row_plans_for_eight_gpus_and_a_row_that_cannot_is_named():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and f"{len(ROWS)} of {len(ROWS)} rows plan" in proc.stdout, proc.stdout + proc.stderr
    # model=tiny has 2 layers: an interleaved pipeline of 2 stages x 2 per rank cannot split it
    interleaved = Row("x", ("strategy=pipeline", "strategy.microbatches=4", "strategy.schedule=interleaved"))
    assert "at most model.n_layer=2 stages" in plan_error(interleaved, 8)


def test_every_rows_command_is_one_hydra_parses():
    """Each row's command, its run folder included, is a list of overrides Hydra takes (an H100 session found
    "gpt2_124m train=gpu MFU" and "fp32 (TF32)" rows refused: their folder names held "=" and "(")."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for row in ROWS:
        overrides = command(row.folder(REPO / "runs"), row.command_overrides(8))[3:]
        assert len(parser.parse_overrides(overrides)) == len(overrides), row.name
    assert len({row.folder(REPO) for row in ROWS}) == len(ROWS)


def on_cpu(name: str, extra: tuple[str, ...], data_overrides: list[str]) -> Row:
    row = next(r for r in ROWS if r.name == name)
    return dataclasses.replace(row, overrides=(*row.overrides, *ON_CPU, *extra, *data_overrides))


@pytest.mark.slow
@pytest.mark.parametrize("name, extra, expected", [
    # NCCL aborts the survivors of a lost rank; on gloo debug.abort_on_collective_error does as NCCL does
    ("a rank killed under NCCL", ("debug.abort_on_collective_error=true",), "attempts lines 1, lost rank [1]: ok"),
    ("straggler on the device", (), "flagged: yes"),
    # the probe finds the slow rank where its peers wait inside forward/backward (shorter than on a GPU)
    ("straggler under fsdp", ("train.max_steps=20",), "flagged: yes"),
    ("straggler under pipeline", ("train.max_steps=20",), "flagged: yes"),
])
def test_a_gpu_row_run_on_cpu_is_checked_from_its_run_folder(name, extra, expected, data_overrides, tmp_path):
    result = run_row(on_cpu(name, extra, data_overrides), 2, tmp_path)
    assert "error" not in result and expected in result["check"], result
    results = {"device": "cpu", "world": 2, "torch": "x", "rows": {name: result}}
    assert f"| {name} | 2 | ok |" in table(results)


@pytest.mark.slow
def test_a_smoke_row_run_on_cpu_trains_resumes_is_preempted_and_finishes(data_overrides, tmp_path):
    """The four attempts of a smoke row, asynchronous saves included: each must be a run the launcher continues
    (the first GPU session found the resume refused, the schedule changing with train.max_steps)."""
    result = run_row(on_cpu("ddp", ("checkpoint.async=true",), data_overrides), 2, tmp_path)
    assert "error" not in result and result["steps"], result
    assert result["attempts"] == ["train", "resume", "preempt", "same command again"]
