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


NAME_MAX = 255  # bytes in one folder name (Linux, and the file systems clusters use)


def check_run_name(run: str) -> None:
    """A run's name is a folder's, and part of every path of the run that reaches the job's shell lines (quoted
    there): a name a path cannot hold, or that a shell or a scheduler's script reader would split, is refused; so is
    a '%', which schedulers read as a pattern in a job's log file names (%j, %x, ...)."""
    one_line("run", run)
    if not run.strip() or "/" in run or ".." in run or "%" in run or any(c.isspace() for c in run) \
            or len(run.encode()) > NAME_MAX:
        raise ConfigError("run", run, f"a folder name under runs/: not empty, at most {NAME_MAX} bytes, no '/', "
                                      "no '..', no '%' (a scheduler's log name patterns) and no spaces or tabs")
