"""A rank's logging: every line says which rank wrote it; each rank also keeps its own log file in the run folder,
and what every rank says alike reaches the console once, from rank 0."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from gpt.collectives.process_group import DistEnv
from gpt.resilience.disk_faults import LogFile
from gpt.run_folder import RunFolder

EVERY_RANK = "every_rank"  # a log record's flag: every rank logs it alike (its own log file), rank 0's console says it


def setup_logging(run_dir: Path, env: DistEnv) -> None:
    """Every line says which rank wrote it; each rank also keeps its own log file in the run folder."""
    folder = RunFolder(run_dir)
    folder.logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"[rank{env.rank} %(asctime)s %(levelname)s] %(message)s", "%H:%M:%S")
    file = LogFile(folder.log(env.rank))  # a full disk drops its lines, said once
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if env.is_main else logging.WARNING)
    if not env.is_main:  # what every rank says alike reaches the console once, from rank 0
        console.addFilter(lambda record: not getattr(record, EVERY_RANK, False))
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    for handler in (file, console):
        handler.setFormatter(fmt)
        root.addHandler(handler)
