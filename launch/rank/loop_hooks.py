"""What a rank adds to its training loop (gpt.train.hooks): its attempt marked begun, the data folder watched, an
evaluation job per checkpoint where the backend has them (rank 0), and the first step's compile time and cache hits
(Inductor's caches pointed at the run's before the model is built)."""
from __future__ import annotations

from pathlib import Path

from gpt.collectives.process_group import DistEnv
from gpt.train.compile_cache import CompileRecord
from gpt.train.data_watch import DataWatch
from gpt.train.hooks import LoopHook
from launch.backends import get_backend
from launch.launch_config import LaunchConfig
from launch.run.attempts import Attempt, BeginAttempt


def rank_hooks(attempt: Attempt, env: DistEnv, run: LaunchConfig, run_dir: Path) -> list[LoopHook | None]:
    queue = get_backend(run.cluster.name).queue
    after_save = queue.after_save_hook(run, run_dir) if env.is_main and queue else None
    return [BeginAttempt(attempt, env.is_main, run.data.dir), DataWatch(run.data.dir, env.is_main), after_save,
            CompileRecord(run.train, run_dir)]
