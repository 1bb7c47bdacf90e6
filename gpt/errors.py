"""Errors a user can cause. The launcher prints them as one short message, without a traceback."""

# Exit codes, the same from every process: a rank, a Slurm task, the launcher.
EXIT_FAILED = 1     # a run that was started failed
EXIT_USER = 2       # a user error, caught before anything ran
EXIT_PREEMPTED = 3  # a rank saved a checkpoint after a signal and the job was not requeued: run again to resume
EXIT_HANG = 4       # a rank's watchdog saw no progress (RUN_DIR/hang-N.txt says where) and the job was not requeued
EXIT_INTERRUPTED = 130  # Ctrl-C twice: stopped at once (128 + SIGINT, as a shell reports it)


class UserError(Exception):
    """Something the user can fix: bad config, missing data, impossible topology, corrupt checkpoint."""


class ConfigError(UserError, ValueError):
    """A config key holds a value that cannot work; the message names the key, the value and what is valid."""

    def __init__(self, key: str, value: object, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"{key}={value!r} is not valid: {valid}")
