"""One module ends an attempt and decides what comes next (launch.recovery.decision): each cause to its outcome, the
progress rule, one decider per attempt. A scheduler stand-in records what was asked of it; tests/slurm asks the
real one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt.config import schema
from launch import launch_config
from gpt.run_folder import Next, RunFolder
from helpers import compose
from launch.rank.job_env import ROUND_VAR, JobEnvironment
from launch.recovery.decision import Cause, Ending, recover


class Scheduler(JobEnvironment):
    scheduler = "stand-in"

    def __init__(self, restart: int = 0, grants: bool = True, link: str | None = None, environ=None):
        super().__init__(environ or {})
        self.asked: list[tuple] = []
        self._restart, self.grants, self.link = restart, grants, link

    @property
    def job_id(self) -> str:
        return "77"

    @property
    def restart(self) -> int:
        return self._restart

    @property
    def hosts(self) -> list[str]:
        return ["n1", "n2", "n3"]

    def requeue(self, max_restarts: int) -> tuple[bool, str]:
        self.asked.append(("requeue",))
        return self.grants, "requeued job 77" if self.grants else "restart limit reached"

    def requeue_excluding(self, hosts: list[str], max_restarts: int) -> tuple[bool, str]:
        self.asked.append(("requeue_excluding", hosts))
        return self.grants, f"requeued job 77, without {','.join(hosts)}" if self.grants else "no node left"

    def next_link(self, run_dir) -> str | None:
        return self.link


def end(run_dir: Path, job: JobEnvironment, cause: Cause, hosts: tuple[str, ...] = (), **kw) -> Ending:
    return Ending(run_dir, job, cause, kw.pop("ended", cause.value), 5, hosts, {"first_step": 0, "last_step": 0},
                  **kw)


@pytest.mark.parametrize("cause, hosts, asked, outcome", [
    (Cause.STOPPED, (), [], Next.STOP),
    (Cause.PREEMPTED, (), [("requeue",)], Next.REQUEUE),
    (Cause.NODE_FAILURE, ("n2",), [("requeue",)], Next.REQUEUE),  # the scheduler keeps the job off it itself
    (Cause.STRAGGLER, ("n2",), [("requeue_excluding", ["n2"])], Next.REQUEUE),
    (Cause.HEALTH, ("n2",), [("requeue_excluding", ["n2"])], Next.REQUEUE),
    (Cause.HANG, ("n2",), [("requeue_excluding", ["n2"])], Next.REQUEUE),
    (Cause.LOST_RANK, (), [("requeue",)], Next.REQUEUE),
])
def test_each_cause_to_its_outcome_written_once(tmp_path, cause, hosts, asked, outcome):
    job = Scheduler()
    got = recover(end(tmp_path, job, cause, hosts))
    assert (got.next, job.asked) == (outcome, asked)
    (line,) = RunFolder(tmp_path).attempts.read()
    assert (line.next, line.note, line.ended) == (outcome, got.note, cause.value)


def test_a_refused_requeue_stops_and_says_how_to_continue_but_a_flagged_node_is_kept(tmp_path):
    job = Scheduler(grants=False)
    stop = recover(end(tmp_path, job, Cause.HANG, ("n2",)))
    assert stop.next is Next.STOP and stop.note == ("no node left; the same command continues the run from the "
                                                    "start (no checkpoint yet)")
    kept = recover(end(tmp_path / "other", Scheduler(grants=False), Cause.HEALTH, ("n2",)))
    assert kept.next is Next.CONTINUE and not (tmp_path / "other" / "attempts.jsonl").exists()


def test_a_kept_node_leaves_the_attempts_line_to_the_attempt(tmp_path):
    """Training went on: the attempt's own line, when it ends, is still written (the claim was given back)."""
    job = Scheduler(grants=False)
    recover(end(tmp_path, job, Cause.HEALTH, ("n2",)))
    job.grants = True
    assert recover(end(tmp_path, job, Cause.PREEMPTED)).next is Next.REQUEUE
    assert [a.ended for a in RunFolder(tmp_path).attempts.read()] == ["preempted"]


def test_a_chain_link_queued_takes_over_from_a_requeue_but_not_from_ctrl_c(tmp_path):
    job = Scheduler(link="78")
    got = recover(end(tmp_path, job, Cause.HANG, ("n2",)))
    assert (got.next, got.link, job.asked) == (Next.NEXT_LINK, "78", [])
    assert RunFolder(tmp_path).attempts.read()[0].next_link == "78"
    assert recover(end(tmp_path / "b", Scheduler(link="78"), Cause.STOPPED)).next is Next.STOP


def checkpoint(run_dir: Path, step: int) -> None:
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_text("")
    (folder / "meta.json").write_text(json.dumps({"step": step, "save_index": step}))


@pytest.mark.parametrize("before", [{"ended": "hang"}, {"ended": "rank 1 was killed", "lost_rank": 1},
                                    {"ended": "node failure: n2 gone (no heartbeat from any of its ranks)",
                                     "hang_report": "hang.txt"}])  # the watchdog found its host lost
@pytest.mark.parametrize("cause", [Cause.HANG, Cause.LOST_RANK])
def test_the_progress_rule_bounds_the_runs_own_faults(tmp_path, before, cause):
    RunFolder(tmp_path).attempts.append("77", 0, {**before, "requeued": True})
    job = Scheduler(restart=1)
    got = recover(end(tmp_path, job, cause, began=None))
    assert got.next is Next.STOP and job.asked == []
    # the fault named, and where the run continues from: no checkpoint yet is "the start", not "step None"
    assert got.note.startswith("not requeued: the attempt before ") and "newer than the start was saved" in got.note
    assert got.note.endswith("the same command continues the run from the start (no checkpoint yet)")


def test_the_progress_rule_lets_a_recovery_through_after_a_newer_checkpoint_and_spares_other_causes(tmp_path):
    RunFolder(tmp_path).attempts.append("77", 0, {"ended": "hang", "requeued": True})
    checkpoint(tmp_path, 10)
    assert recover(end(tmp_path, Scheduler(restart=1), Cause.HANG, began=5)).next is Next.REQUEUE
    RunFolder(tmp_path / "b").path.mkdir()
    RunFolder(tmp_path / "b").attempts.append("77", 0, {"ended": "hang", "requeued": True})
    assert recover(end(tmp_path / "b", Scheduler(restart=1), Cause.NODE_FAILURE, ("n2",))).next is Next.REQUEUE


def test_one_process_decides_an_attempt_another_reads_its_outcome(tmp_path):
    """A lost rank's task and a hung rank's watchdog both end the same attempt: only the first asks the scheduler
    (the hang's copy used to ask again, and to start a round of its own)."""
    first, second = Scheduler(), Scheduler()
    assert recover(end(tmp_path, first, Cause.LOST_RANK, ended="rank 1 was killed")).next is Next.REQUEUE
    got = recover(end(tmp_path, second, Cause.HANG, ("n2",)))
    assert (got.next, got.note, second.asked) == (Next.REQUEUE, "requeued job 77", [])
    assert len(RunFolder(tmp_path).attempts.read()) == 1


def test_a_spare_takes_the_named_hosts_place_inside_the_allocation(tmp_path):
    schema.save(launch_config.parse(compose("cluster=srun", "cluster.spare_nodes=1")), tmp_path / "config.yaml")
    job = Scheduler(environ={ROUND_VAR: "0"})
    got = recover(end(tmp_path, job, Cause.HANG, ("n2",)))
    assert got.next is Next.RESTART and job.asked == [] and got.restart.replaced == {"n2": "n3"}
    (line,) = RunFolder(tmp_path).attempts.read()
    assert (line.in_job_restart, dict(line.replaced), line.requeued) == (1, {"n2": "n3"}, False)
    request = json.loads((tmp_path / "rounds" / "job77-restart0" / "round-1.json").read_text())
    assert request["hosts"] == ["n1", "n3"]


def test_a_killed_attempts_line_is_made_from_its_mark(tmp_path):
    mark = {"job_id": "77", "restart": 0, "started": 1.0, "first_step": 0, "nodes": ["n1", "n2"]}
    checkpoint(tmp_path, 5)
    RunFolder(tmp_path).attempts.mark(mark)
    got = recover(Ending(tmp_path, Scheduler(), Cause.LOST_RANK, "rank 1 was killed", 5, record={"lost_rank": 1},
                         mark=mark))
    (line,) = RunFolder(tmp_path).attempts.read()
    assert got.next is Next.REQUEUE and (line.first_step, line.last_step, line.lost_rank, line.nodes) == (
        0, 5, 1, ("n1", "n2"))
    assert RunFolder(tmp_path).attempts.read_mark() is None
