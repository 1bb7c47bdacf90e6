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
    "bad precision": (["train.precision=fp4"], "train.precision='fp4' is not valid: one of fp32, bf16, fp16, fp8"),
    "batch not divisible": (["train.global_batch_size=12", "train.micro_batch_size=5"],
                            "train.micro_batch_size=5 is not valid: a divisor of the per-rank batch 12"),
    "single strategy on two ranks": (["cluster.tasks_per_node=2"], "strategy=single runs exactly one process"),
    "bad watchdog budget": (["watchdog.step_s=-5"], "watchdog.step_s=-5 is not valid: a positive number of seconds"),
    # Hydra refuses these against the schema (gpt/config/schema.py) while it composes: the same one line
    "unknown train key": (["train.foo=1"], "train.foo=1 is not valid: known train keys are activation_checkpointing,"),
    "unknown top-level key": (["foo=1"], "foo=1 is not valid: known top-level keys are budget, checkpoint,"),
    "a word for a number": (["train.lr=abc"], "train.lr='abc' is not valid: a number"),
    "a word for a flag": (["checkpoint.async=maybe"], "checkpoint.async='maybe' is not valid: true or false"),
    "negative learning rate": (["train.lr=-1"], "train.lr=-1 is not valid: a positive learning rate"),
    "a key of another strategy": (["strategy.stage=9"], "strategy.stage=9 is not valid: strategy=single reads name"),
    "a key of another backend": (["cluster.partition=gpu"], "cluster.partition='gpu' is not valid: cluster=local reads "
                                 "gpu_memory_gb, name, signal_delay_s, tasks_per_node (cluster.partition is for cluster=srun|slurm)"),
    "a ZeRO stage that does not exist": (["strategy=deepspeed", "strategy.stage=9"],
                                         "strategy.stage=9 is not valid: 0, 1, 2 or 3 (ZeRO stage)"),
    "unknown preset": (["model=gpt5"], "model='gpt5' is not valid: one of gpt2_1.5b, gpt2_124m,"),
    "an override Hydra cannot parse": (["train.lr=[1"], "an override Hydra cannot parse: no viable alternative"),
    # a line break would end the job script's #SBATCH block and drop --signal, --requeue and --time after it
    "a newline in cluster.partition": (["cluster=slurm", "cluster.partition='debug\n#SBATCH --x'"],
                                       "cluster.partition='debug\\n#SBATCH --x' is not valid: one line: no newline"),
    "a carriage return in a cluster.sbatch value": (["cluster=slurm", "+cluster.sbatch.comment='a\rb'"],
                                                    "cluster.sbatch.comment='a\\rb' is not valid: one line"),
    "a run name that leaves runs/": (["run=../../etc"], "run='../../etc' is not valid: a folder name under runs/: "
                                     "not empty, at most 255 bytes, no '/', no '..', no '%' (a scheduler's log name patterns) and no "
                                     "spaces or tabs"),
    "a run name with a slash": (["run=a/b"], "run='a/b' is not valid: a folder name under runs/"),
    # the run's paths reach the job's shell lines (quoted there) and Slurm's own reading of #SBATCH lines
    "a run name a shell would split": (["run='a b'"], "run='a b' is not valid: a folder name under runs/"),
    "a run name no folder can hold": ([f"run={'x' * 256}"], f"run='{'x' * 256}' is not valid: a folder name under "
                                      "runs/: not empty, at most 255 bytes"),
}


@pytest.mark.parametrize("overrides,message", CASES.values(), ids=CASES.keys())
@pytest.mark.slow
def test_bad_config_is_one_clear_line(overrides, message, tmp_path, prepared_data):
    proc = launch(*prepared_data, *overrides, run_dir=tmp_path / "run", check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr  # one line
    assert "Traceback" not in proc.stderr + proc.stdout
    # nothing ran, nothing is left: not even the folder Hydra made for the command's log, nor its launch lock
    assert not (tmp_path / "run").exists(), list((tmp_path / "run").iterdir())


@pytest.mark.slow
def test_missing_data_file_names_the_path_and_where_to_get_it(tmp_path):
    missing = tmp_path / "nowhere" / "input.txt"
    proc = launch(f"data.text_path={missing}", f"data.dir={tmp_path / 'prepared'}", run_dir=tmp_path / "run",
                  check=False)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "char-rnn" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_sweep_value_hydra_refuses_stops_the_sweep(tmp_path, data_overrides):
    proc = launch(*data_overrides, "model=tiny", "train.lr=1e-3,abc", run_dir=tmp_path / "sweep", check=False,
                  multirun=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: train.lr='abc' is not valid: a number\n"  # Hydra checks every point first
    assert not list(tmp_path.glob("sweep/*/metrics"))
