"""train.compile keeps Inductor's caches in the run folder: a second attempt of the run (a resume, as a requeue runs
it) loads the graphs the first compiled, and a run of another model shape, pointed at the same caches, misses them
and compiles its own."""
from __future__ import annotations

import pytest

from gpt.run_folder import RunFolder
from helpers import launch

RUN = ["model=tiny", "model.n_layer=2", "train.compile=true", "train.device=cpu", "train.global_batch_size=2",
       "train.eval_interval=0", "train.log_interval=1", "checkpoint.interval_steps=1"]


def startup(run_dir) -> dict:
    return dict(RunFolder(run_dir).attempts.read()[-1].startup)


@pytest.mark.slow
def test_a_second_attempt_loads_the_first_ones_compiled_graphs_and_another_model_does_not(tmp_path, prepared_data):
    run_dir, other = tmp_path / "run", tmp_path / "other"
    launch(*RUN, *prepared_data, "train.max_steps=1", run_dir=run_dir)
    first = startup(run_dir)
    assert any(RunFolder(run_dir).compile_cache.rglob("*")), "the first attempt left no compile cache in the run"
    assert first["compile_cache_misses"] > 0 and first["compile_cache_hits"] == 0, first

    launch(*RUN, *prepared_data, "train.max_steps=2", "train.decay_steps=1", run_dir=run_dir)  # resumed at step 1
    second = startup(run_dir)
    assert second["compile_cache_hits"] > 0 and second["compile_cache_misses"] == 0, second
    assert second["compile_s"] < first["compile_s"], (first, second)

    # another shape, the same caches: Inductor's keys hold the graph, so it misses rather than load the first model's
    launch(*RUN, *prepared_data, "model.n_embd=48", "train.max_steps=1",
           f"train.compile_cache_dir={RunFolder(run_dir).compile_cache}", run_dir=other)
    changed = startup(other)
    assert changed["compile_cache_misses"] > 0 and changed["compile_cache_hits"] == 0, changed
