"""Errors a user can cause. The launcher prints them as one short message, without a traceback."""

# Exit codes, the same from every process: a rank, a Slurm task, the launcher.
EXIT_FAILED = 1     # a run that was started failed
EXIT_USER = 2       # a user error, caught before anything ran
EXIT_PREEMPTED = 3  # a rank saved a checkpoint after a signal and the job was not requeued: run again to resume
EXIT_HANG = 4       # a rank's watchdog saw no progress (RUN_DIR/hang-*.txt says where) and the job was not requeued
# the launcher, launch.status: the scheduler does not answer, so where its jobs stand is unknown (no launcher exits
# with a rank's EXIT_HANG: it names the hang and exits 1)
EXIT_UNKNOWN = 4
EXIT_INTERRUPTED = 130  # Ctrl-C twice: stopped at once (128 + SIGINT, as a shell reports it)


class UserError(Exception):
    """Something the user can fix: bad config, missing data, impossible topology, corrupt checkpoint."""


class ConfigError(UserError, ValueError):
    """A config key holds a value that cannot work; the message names the key, the value and what is valid."""

    def __init__(self, key: str, value: object, valid: str):
        self.key, self.value, self.valid = key, value, valid
        shown = int(value) if isinstance(value, float) and value.is_integer() else value  # as typed: -1, not -1.0
        super().__init__(f"{key}={shown!r} is not valid: {valid}")


def error_line(error: BaseException | str, *, from_end: bool = False, prefer_error: bool = False,
               limit: int | None = None) -> str:
    """The one line of an error's message that a one-line report shows: its first non-blank line (from_end: its
    last), or with prefer_error the first (last) one that mentions an error, when one does (Slurm and DCP put
    what went wrong among lines of context). An exception with no message gives its type's name."""
    text = str(error)
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if from_end:
        lines.reverse()
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    errors = [x for x in lines if "error" in x.lower()] if prefer_error else []
    return (errors or lines)[0][:limit]


def failure_line(error: BaseException) -> str:
    """An unexpected exception in one line: its type and its message's first non-blank line (a message that begins
    with a newline, as torch's pipelining schedules raise, would otherwise say nothing after the type)."""
    what = error_line(str(error))
    return f"{type(error).__name__}: {what}" if what else type(error).__name__
