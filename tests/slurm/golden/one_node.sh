#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=1
#SBATCH --error=<LOGS>/%j_0_log.err
#SBATCH --job-name=tiny-ddp
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=<LOGS>/%j_0_log.out
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=10

# setup
export GPTLAUNCH_ATTEMPT_START=$(date +%s.%N)

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <LOGS>/%j_%t_log.out --error <LOGS>/%j_%t_log.err --kill-on-bad-exit=1 --cpus-per-task=1 bash -c 'trap "" TERM USR2; exec "$0" "$@"' <PYTHON> -u -m submitit.core._submit <LOGS>


# teardown
code=$?
if [ $code -ne 0 ]; then trap '' TERM; <PYTHON> -m launch.backends.slurm.start_preempted <LOGS>; fi
exit $code