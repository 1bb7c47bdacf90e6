"""A packed allocation's end, decided once for all its points by the recovery wing (launch.recovery.packed), by the
rules of one run's end: a preemption requeues it, the user's cancel stops it, and the backend only carries the
decision out (launch.backends.slurm.pack_task, start_preempted). A scheduler stand-in records what was asked of it;
tests/slurm/test_pack.py asks the real one."""
from __future__ import annotations

from pathlib import Path

import pytest

from gpt.config import schema
from gpt.run_folder import Next, RunFolder
from helpers import compose
from launch import launch_config
from launch.rank.job_env import Preemption
from launch.recovery.packed import recover_allocation
from launch.run.job_record import request_cancel
from test_recovery import Scheduler


class Packed(Scheduler):
    def __init__(self, grants: bool = True, cancelled: bool = False, preemption: Preemption | None = None,
                 restart: int = 0):
        super().__init__(restart, grants)
        self._cancelled, self._preemption = cancelled, preemption

    def cancelled(self) -> bool:
        return self._cancelled

    def preemption(self) -> Preemption | None:
        return self._preemption


@pytest.fixture
def points(tmp_path) -> list[Path]:
    config = launch_config.parse(compose("preemption.max_restarts=3"))
    dirs = [tmp_path / f"seed={s}" for s in (1, 2, 3)]
    for d in dirs:
        d.mkdir()
        schema.save(config, RunFolder(d).config)
    return dirs


def no_lines(points: list[Path]) -> bool:
    """Each point's ranks write their own line: the allocation's decision writes none."""
    return not any(RunFolder(d).attempts.log.exists() for d in points)


def test_a_preempted_allocation_is_requeued_once_for_all_its_points(points):
    job = Packed()
    outcome = recover_allocation(points, job)
    assert (outcome.next, outcome.note, job.asked) == (Next.REQUEUE, "requeued job 77", [("requeue",)])
    assert recover_allocation(points, Packed()) is None  # the batch step after the task: decided already
    assert no_lines(points)


@pytest.mark.parametrize("where", [0, 2])
def test_the_users_cancel_in_any_point_stops_the_whole_allocation_without_a_requeue(points, where):
    request_cancel(points[where], ["77"])
    job = Packed()
    outcome = recover_allocation(points, job)
    assert outcome.next is Next.STOP and job.asked == [], outcome
    assert outcome.note == ("cancelled by the user; the same command continues its 3 point(s), each from its newest "
                            "checkpoint")
    assert no_lines(points)


def test_scancel_is_the_users_cancel_too(points):
    job = Packed(cancelled=True, preemption=Preemption("preempted by another job", True))
    assert recover_allocation(points, job).next is Next.STOP and job.asked == []


def test_a_requeue_refused_stops_and_a_site_that_cancels_preempted_jobs_says_how_to_continue(points):
    refused = recover_allocation(points, Packed(grants=False))
    assert (refused.next, refused.note) == (Next.STOP, "restart limit reached")
    cancels = Packed(False, preemption=Preemption("preempted by another job (PreemptMode=CANCEL)", False), restart=1)
    stop = recover_allocation(points, cancels)
    assert stop.next is Next.STOP and stop.note.endswith("continues its 3 point(s), each from its newest checkpoint")


def test_a_packers_task_killed_as_it_started_is_decided_by_the_batch_step_unless_the_task_decided(points):
    from launch.backends.slurm.start_preempted import after_failed_pack

    assert after_failed_pack(points, Packed()) is None  # Slurm preempts nothing: srun failed for another reason
    preempted = Packed(preemption=Preemption("preempted by another job", True))
    assert after_failed_pack(points, preempted).next is Next.REQUEUE and preempted.asked == [("requeue",)]
    again = Packed(preemption=Preemption("preempted by another job", True))
    assert after_failed_pack(points, again) is None and again.asked == []


def test_a_packed_jobs_one_line_names_the_preemption_once(points, capsys):
    """The points' ranks leave the requeue to the packer: its line (and the batch step's, when the packer was killed as
    it started) says who preempted the allocation, once, then what follows."""
    from launch.backends.slurm.start_preempted import after_failed_pack

    said = "preempted by job 10 (partition urgent, user gl-other) at T; the run's partition low: PreemptMode=REQUEUE"
    outcome = after_failed_pack(points, Packed(preemption=Preemption(said, True)))
    assert (outcome.next, outcome.note) == (Next.REQUEUE, f"{said}; requeued job 77"), outcome
    err = capsys.readouterr().err
    assert err.count("preempted by job 10") == 1 and err.startswith("packed job, killed as its task started: "), err
