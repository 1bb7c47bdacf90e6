"""RUN_DIR/attempts.jsonl: one line per attempt of a run (rank 0 writes it when the attempt ends)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from launch.job_env import JobEnvironment


def log_attempt(run_dir: Path, job: JobEnvironment, record: dict[str, Any]) -> None:
    record = {"job_id": job.job_id, "restart": job.restart, "time": time.time(), **record}
    with open(run_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
