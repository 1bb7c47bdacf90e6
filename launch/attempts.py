"""RUN_DIR/attempts.jsonl: one line per attempt of a run (rank 0 writes it when the attempt ends), with its
start-up breakdown and its goodput record (gpt.goodput)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gpt.goodput import read_attempts
from launch.job_env import JobEnvironment


def log_attempt(run_dir: Path, job: JobEnvironment, record: dict[str, Any]) -> None:
    record = {"job_id": job.job_id, "restart": job.restart, "time": time.time(), **record}
    with open(run_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def goodput_record(run_dir: Path, started: float, startup: dict[str, float], summary: dict[str, Any]) -> dict:
    """Where this attempt's allocated time went; `started` is when the attempt began (epoch seconds)."""
    earlier = read_attempts(run_dir)
    last = earlier[-1].get("last_step") if earlier else None
    replayed = max(last - summary["first_step"], 0) if isinstance(last, int) else 0
    # start-up ends where the first step begins: that step is training time
    to_first = startup.get("to_first_step_s", 0.0) - startup.get("first_step_s", 0.0)
    return {"allocated_s": round(time.time() - started, 3), "startup_s": round(max(to_first, 0.0), 3),
            "load_s": startup.get("checkpoint_load_s", 0.0), "steps_replayed": replayed, **summary.get("spent", {})}
