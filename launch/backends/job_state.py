"""Where a submitted job stands, as every scheduler's backend reports it: a typed, scheduler-neutral state that code
outside launch/backends/ decides on, with the scheduler's own words kept only to show the user. Torch-free."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class JobState(enum.Enum):
    PENDING = "pending"  # waits to run: queued, held, suspended, requeued
    RUNNING = "running"
    ENDING = "ending"  # its processes are ending; the scheduler still lists it
    ENDED = "ended"  # the scheduler will not run it again by itself
    GONE = "gone"  # the scheduler no longer knows the job
    UNKNOWN = "unknown"  # the scheduler does not answer: the job may wait, run, or be gone

    @property
    def live(self) -> bool:
        """The job may still train: it waits, runs, or its processes are ending."""
        return self in (JobState.PENDING, JobState.RUNNING, JobState.ENDING)

    @property
    def over(self) -> bool:
        return self in (JobState.ENDED, JobState.GONE)


@dataclass(frozen=True)
class JobStanding:
    job_id: str
    state: JobState
    shown: str  # the scheduler's word for the state, as its own tools show it (e.g. PENDING, CANCELLED)
    reason: str = ""  # why it waits, in the scheduler's words ("" when it does not say)
    cancel: str = ""  # the scheduler's command that cancels it
    watch: str = ""  # the scheduler's command that shows it in the queue
    stuck: str | None = None  # it waits and will not start by itself: what the user can do
    cancelled: bool = False  # it ended because someone cancelled it (not a failure)
    theirs: bool = False  # it may still run, and is another user's: this user can neither cancel nor signal it

    @property
    def label(self) -> str:
        """The state as the verbs show it: the scheduler's word, and whose job it is when it is not this user's."""
        return f"{self.shown} (another user's job)" if self.theirs else self.shown


class SchedulerUnavailable(RuntimeError):
    """The scheduler could not be asked (its commands are missing, time out, or its controller is down)."""

    scheduler = "the scheduler"  # its name in the lines that say it does not answer
