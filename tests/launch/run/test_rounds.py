"""In-job restarts' round requests (launch.run.rounds) are a launch's own: the launcher and the ranks it started find
the same rounds, and launches that share one allocation (salloc, then cluster=local or cluster=srun) share none."""
from __future__ import annotations

from launch.rank.job_env import LAUNCH_VAR, ROUND_VAR, JobEnvironment, job_environment
from launch.run.rounds import InJobRestart, Rounds


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
