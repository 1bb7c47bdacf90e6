"""train.compile keeps Inductor's caches in the run folder: a second attempt of the run (a resume, as a requeue runs
it) loads the graphs the first compiled, and a run of another model shape, pointed at the same caches, misses them
and compiles its own."""
from __future__ import annotations

import pytest

from gpt.run_folder import RunFolder
from helpers import launch

RUN = ["model=tiny", "model.n_layer=2", "train.compile=true", "train.device=cpu", "train.global_batch_size=2",
       "train.eval_interval=0", "train.log_interval=1", "checkpoint.interval_steps=1",
       "train.compile_cache_dir=null"]  # the run folder's own, not the suite's shared one (tests/helpers.py)


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
    launch(*RUN[:-1], *prepared_data, "model.n_embd=48", "train.max_steps=1",
           f"train.compile_cache_dir={RunFolder(run_dir).compile_cache}", run_dir=other)
    changed = startup(other)
    assert changed["compile_cache_misses"] > 0 and changed["compile_cache_hits"] == 0, changed


def test_the_caches_are_the_run_folders_unless_a_site_names_a_folder(tmp_path):
    from gpt.config.train import TrainConfig
    from gpt.train.compile_cache import CACHE_DIR, point_caches

    environ: dict[str, str] = {}
    assert point_caches(TrainConfig(compile=False), tmp_path, environ) is None and not environ
    assert point_caches(TrainConfig(compile=True), tmp_path, environ) == tmp_path / "compile_cache"
    assert environ[CACHE_DIR] == str(tmp_path / "compile_cache")
    site = tmp_path / "node-local"
    assert point_caches(TrainConfig(compile=True, compile_cache_dir=str(site)), tmp_path, environ) == site
    assert environ[CACHE_DIR] == str(site)


def test_the_start_up_line_says_how_long_compiling_took_and_what_the_caches_served():
    from launch.run.startup import StartupClock

    line = StartupClock.describe({"first_step_s": 20.0, "to_first_step_s": 25.0, "compile_s": 19.5,
                                  "compile_cache_hits": 3, "compile_cache_misses": 0})
    assert line.endswith("first step 20.0); compiling took 19.5 s of the first step (compile cache: 3 hits, 0 misses)")
    assert "compil" not in StartupClock.describe({"first_step_s": 1.0, "to_first_step_s": 2.0})


def test_a_site_folder_is_made_absolute_where_the_launcher_started(tmp_path, monkeypatch):
    from helpers import compose
    from launch import launch_config
    from launch.planning.plan import absolute_paths

    monkeypatch.chdir(tmp_path)
    run = absolute_paths(launch_config.parse(compose("train.compile=true", "train.compile_cache_dir=caches")))
    assert run.train.compile_cache_dir == str(tmp_path / "caches")
    assert absolute_paths(launch_config.parse(compose())).train.compile_cache_dir is None
