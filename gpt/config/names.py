"""Values that become a folder or a line of a job script: a run name that stays one folder under runs/, and
values without line breaks (a newline in a job script's directive ends the directive block, and every directive
after it, the time limit and the requeue among them, is silently dropped)."""
from __future__ import annotations

from typing import Any

from gpt.errors import ConfigError

LINE_BREAKS = ("\n", "\r", "\0")


def one_line(key: str, value: Any) -> None:
    """Refuse a newline, carriage return or NUL in `value`, or in any key or value of a mapping or list in it."""
    if isinstance(value, dict):
        for k, v in value.items():
            one_line(f"{key}.{k}", k)
            one_line(f"{key}.{k}", v)
    elif isinstance(value, list | tuple):
        for v in value:
            one_line(key, v)
    elif isinstance(value, str) and any(c in value for c in LINE_BREAKS):
        raise ConfigError(key, value, "one line: no newline, carriage return or NUL (it becomes a line of the job "
                                      "script, where a line break would drop the directives after it)")


def check_run_name(run: str) -> None:
    one_line("run", run)
    if not run.strip() or "/" in run or ".." in run:
        raise ConfigError("run", run, "a folder name under runs/: not empty, no '/' and no '..'")
