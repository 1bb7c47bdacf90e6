"""Mistakes a user can make get one clear line before any training starts: the key, the value, what is valid."""
from __future__ import annotations

import pytest

from helpers import launch

CASES = {
    "n_embd not divisible by n_head": (["model.n_embd=100", "model.n_head=3"],
                                       "model.n_embd=100 is not valid: a multiple of model.n_head=3"),
    "n_head not divisible by groups": (["model.n_query_groups=3"],
                                       "model.n_query_groups=3 is not valid: a divisor of model.n_head=4"),
    "unknown component": (["model.norm=batchnorm"], "one of layernorm, layernorm_nobias, rmsnorm"),
    "vocabulary smaller than the tokenizer's": (["model.vocab_size=10"], "model.vocab_size=10 is not valid: at least 65"),
    "unknown model key": (["+model.n_layers=3"], "model.n_layers=3 is not valid: known model keys are"),
    "bad precision": (["train.precision=fp8"], "train.precision='fp8' is not valid: one of fp32, bf16, fp16"),
    "batch not divisible": (["train.global_batch_size=12", "train.micro_batch_size=5"],
                            "train.micro_batch_size=5 is not valid: a divisor of the per-rank batch 12"),
    "single strategy on two ranks": (["cluster.tasks_per_node=2"], "strategy=single runs exactly one process"),
    "bad watchdog budget": (["watchdog.step_s=-5"], "watchdog.step_s=-5 is not valid: a positive number of seconds"),
}


@pytest.mark.parametrize("overrides,message", CASES.values(), ids=CASES.keys())
def test_bad_config_is_one_clear_line(overrides, message, tmp_path, data_overrides):
    proc = launch(*data_overrides, *overrides, run_dir=tmp_path / "run", check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "metrics").exists()  # nothing ran


def test_missing_data_file_names_the_path_and_where_to_get_it(tmp_path):
    missing = tmp_path / "nowhere" / "input.txt"
    proc = launch(f"data.text_path={missing}", f"data.dir={tmp_path / 'prepared'}", run_dir=tmp_path / "run",
                  check=False)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "char-rnn" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_preset_lists_the_presets(tmp_path, data_overrides):
    proc = launch(*data_overrides, "model=gpt5", run_dir=tmp_path / "run", check=False)
    assert proc.returncode != 0
    assert "Could not find 'model/gpt5'" in proc.stderr and "gpt2_124m" in proc.stderr
