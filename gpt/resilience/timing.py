"""How long the processes that keep a run alive wait for each other, in seconds, in one place. (Estimates that
models start from, such as the prior cost of a save, live with their models.)"""

# After a job requeued itself, Slurm stops every process of the attempt (SIGTERM, then SIGKILL after its KillWait,
# 30 s by default). A rank, its task wrapper and a task of the stock submitit launcher wait this long for that:
# exiting first would count as a failed task (or, under the stock launcher, as the job's result).
REQUEUE_WAIT_S = 120.0

# A cut-off rank whose watchdog fired waits this long for a rank that is not cut off to claim the hang report (and
# the requeue), before it claims them itself (every rank is cut off when the master's host is the one lost).
REPORTER_GRACE_S = 15.0

# A rank that does not act on a hang waits this long for the acting rank's line in the attempts log (its analysis
# takes up to the silence threshold and a few intervals, then the requeue) to learn whether the job was requeued.
ACTOR_WAIT_S = 45.0

# Rank 0 beats the run folder's lease this often; a lease whose sequence number did not change for LEASE_STALE_S of
# the observer's own clock has lost its holder (a lost node, a frozen process) and may be taken over.
LEASE_BEAT_S = 2.0
LEASE_STALE_S = 20.0

# How often a rank's parent (its task wrapper, srun's launcher) looks whether the rank ended or a signal waits.
RELAY_POLL_S = 0.2

# A rank whose watchdog fired ends within this long (plus REQUEUE_WAIT_S once the job was requeued), whatever its
# report's storage does: a full, read-only or lost file system must not park the allocation.
HANG_EXIT_S = 90.0

# A peer whose heartbeat (its sequence number) has not moved for this long on the observer's own clock is gone: ten
# missed beats at the default interval, well past one slow write on a busy metadata server.
SILENT_S = 10.0

# A watchdog's sleep that overran by more than this: the process was stopped (Ctrl-Z, SIGSTOP) meanwhile, and that
# time counts against no phase's budget (a wake-up would otherwise look like a hang of that long).
FROZEN_S = 10.0

# A rank's watchdog: after a collective failed, a peer's heartbeat must be at least this old for the peer to count
# as lost (a task Slurm saw die: Slurm ends the job first); while stuck, it probes the master's port at most this
# often, each probe waiting this long for a connection.
SCHEDULER_GRACE_S = 10.0
PROBE_EVERY_S = 5.0
PROBE_TIMEOUT_S = 3.0

# A rank aborted by SIGABRT (NCCL's error handling ends every survivor of a lost or failed peer) waits this long for
# its task to learn which peer that was (its record, its error, its stale heartbeat) before taking itself for lost.
ABORT_GRACE_S = SCHEDULER_GRACE_S + 5.0

# A task wrapper's deadlines for its rank, which may be stuck inside a CUDA call (it then ignores SIGTERM, and its
# watchdog may never run): once its attempt has ended (the attempt's line in the attempts log: a requeue, a hang
# another rank reported, a failure), it ends within a requeued rank's wait for Slurm and a watchdog's exit; once a
# stop signal was passed on to it, within the run's longest watchdog budget (the step and the save the signal waits
# for) and that. Past its deadline the wrapper kills it (SIGKILL), so the allocation is never parked. The wrapper
# looks for the attempt's line this often; a process SIGKILL has not ended within KILL_WAIT_S is stuck in the kernel,
# and the wrapper goes on without it.
ENDED_EXIT_S = REQUEUE_WAIT_S + HANG_EXIT_S + 30.0
ENDED_LOOK_S = 5.0
KILL_WAIT_S = 30.0

# A round whose rank 0 stopped beating the lease (dead, frozen, its node lost) has written its attempt's line, or
# asked for the next round, within the run's longest watchdog budget (another rank's watchdog fires) and a fired
# rank's exit; past that and this margin, a spare waiting on it takes the round for over (no line will come). The
# requeued rank's wait for Slurm comes after its line, so it does not count here.
ROUND_SILENT_S = HANG_EXIT_S + 30.0
