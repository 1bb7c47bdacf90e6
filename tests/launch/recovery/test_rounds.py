"""In-job restarts' round requests (launch.recovery.rounds) are a launch's own: the launcher and the ranks it started find
the same rounds, and launches that share one allocation (salloc, then cluster=local or cluster=srun) share none."""
from __future__ import annotations

from pathlib import Path

from gpt.run_folder import RunFolder
from helpers import plan
from launch.rank.job_env import LAUNCH_VAR, ROUND_VAR, JobEnvironment, Preemption, job_environment
from launch.recovery.rounds import InJobRestart, Rounds


def test_a_local_launch_inside_an_allocation_finds_the_round_its_ranks_ask_for(tmp_path):
    inside = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0", LAUNCH_VAR: "L1"}
    rank = job_environment({**inside, ROUND_VAR: "0"})  # a rank sees the allocation's job
    InJobRestart(1, ["h"], [], "hang", 3).begin(tmp_path, rank)
    assert Rounds.of(tmp_path, job_environment(inside)).path(1).exists()  # its launcher, cluster=local
    assert Rounds.of(tmp_path, JobEnvironment({LAUNCH_VAR: "L1"})).path(1).exists()


def test_a_second_launch_in_the_allocation_replays_no_round_of_the_first(tmp_path):
    job = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"}
    InJobRestart(1, ["h"], [], "hang", 3).begin(tmp_path, job_environment({**job, LAUNCH_VAR: "L1"}))
    assert not Rounds.of(tmp_path, job_environment({**job, LAUNCH_VAR: "L2"})).path(1).exists()
    assert Rounds.of(tmp_path, job_environment(job)).name == "job7-restart0"  # a job's own launch (sbatch), as before


class _Job(JobEnvironment):
    """Job 7 as its scheduler describes it, preempted by another job (the Slurm tests cover Slurm's own answers)."""

    scheduler = "test"
    job_id = "7"

    @property
    def restart(self) -> int:
        return int(self.environ.get("RESTART", "0"))

    def end_reason(self, job_id: str) -> str:
        return "requeued by Slurm: preempted by another job"

    def preemption(self) -> Preemption:
        return Preemption("preempted by another job (Slurm)", requeues=True)

    def requeue(self, max_restarts: int) -> tuple[bool, str]:
        return True, "requeued"


def round_asked(run: Path) -> RunFolder:
    """Round 0 of job 7's first attempt lost rank 1 and asked for round 1 on h1 and h3."""
    folder = RunFolder(run)
    folder.metrics.mkdir(parents=True)
    folder.attempts.append("7", 0, {"ended": "lost rank 1", "first_step": 0, "last_step": 12, "in_job_restart": 1})
    InJobRestart(1, ["h1", "h3"], [], "lost rank 1", 3).begin(run, _Job({ROUND_VAR: "0"}))
    return folder


def test_a_round_stopped_before_its_first_step_is_recorded_by_the_next_attempt(tmp_path):
    """Round 1 was asked for, and the job was preempted while its ranks started (its grace time ran out before they
    could save): it wrote no line and no mark. The next attempt records it, as one killed outright, with the hosts
    its request named; round 1 itself, once it begins, takes the request for its own and records nothing."""
    from launch.run.attempts import begin_attempt

    began = round_asked(tmp_path / "round1")
    begin_attempt(tmp_path / "round1", _Job({ROUND_VAR: "1"}), 0.0, first_step=10, nodes=["h1", "h3"])
    assert len(began.attempts.read()) == 1

    requeued = round_asked(tmp_path / "requeued")
    begin_attempt(tmp_path / "requeued", _Job({"RESTART": "1"}), 0.0, first_step=10, nodes=["h1", "h2"])
    stopped = requeued.attempts.read()[1]
    assert (stopped.job_id, stopped.restart, stopped.round) == ("7", 0, 1), stopped
    assert stopped.ended == "requeued by Slurm: preempted by another job", stopped
    assert (stopped.first_step, stopped.last_step, stopped.nodes) == (10, 10, ("h1", "h3")), stopped
    assert stopped.extra["recorded_by"] == "the next attempt" and stopped.goodput["steps"] == 0, stopped


def test_a_preemption_while_a_rounds_ranks_start_is_that_rounds_line(tmp_path):
    """srun failed with no rank having recorded the preemption: the batch step (its job environment is round 0's)
    records it as the newest round's, the one that was starting, and the job is requeued."""
    from launch.backends.slurm.start_preempted import after_failed_step

    folder = round_asked(plan(tmp_path, "model=tiny"))
    outcome = after_failed_step(tmp_path, _Job({}))
    line = folder.attempts.read()[-1]
    assert (line.round, line.ended, line.requeued) == (1, "preempted by another job (Slurm)", True), line
    assert outcome is not None and outcome.runs_again, outcome


def test_a_round_whose_request_cannot_be_read_is_placed_nowhere(tmp_path):
    """Round 1 replaced h2 by h3; its request file is then cut short. Before, reading it failed quietly and round 0's
    placement stood in: h2, the node round 1 left out, got its rank back. Now the task wrapper stops with the line,
    and the rank that records the attempt asks for no further round."""
    from launch.recovery.round_agent import RoundAgent
    from launch.recovery.rounds import RoundUnreadable, in_job_restart

    run = tmp_path / "run"
    plan(run, "preemption.in_job_restarts=3")
    request = Rounds.of(run, _Job({ROUND_VAR: "1"})).path(1)
    request.parent.mkdir(parents=True)
    request.write_text('{"round": 1, "hosts": ["h1", "h')  # torn
    class OnThreeHosts(_Job):
        hosts = ["h1", "h2", "h3"]

    agent = RoundAgent(run, OnThreeHosts({}), "h2")
    try:
        agent.placement(1)
    except RoundUnreadable as e:
        said = str(e)
    else:
        raise AssertionError("round 1 was placed from round 0's nodes")
    assert said == (f"in-job restart 1's request {request} cannot be read (not a round's request): where its ranks "
                    "run is unknown, and round 0's nodes may hold the one it replaced")
    assert in_job_restart(run, _Job({ROUND_VAR: "1"}), "hang") == (None, said)
