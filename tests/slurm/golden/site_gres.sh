#!/bin/bash

# Parameters
#SBATCH --account=proj42
#SBATCH --cpus-per-task=1
#SBATCH --error=<LOGS>/%j_0_log.err
#SBATCH --gres=gpu:2
#SBATCH --job-name=gpt2_124m-fsdp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --open-mode=append
#SBATCH --output=<LOGS>/%j_0_log.out
#SBATCH --requeue
#SBATCH --reservation=maint
#SBATCH --signal=USR1@90
#SBATCH --time=60

# setup
export GPTLAUNCH_ATTEMPT_START=$(date +%s.%N)
export NCCL_DEBUG=WARN
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"-ib
module load cuda/12.4

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <LOGS>/%j_%t_log.out --error <LOGS>/%j_%t_log.err --kill-on-bad-exit=1 --cpus-per-task=1 --mpi=pmix bash -c 'trap "" TERM USR1; exec "$0" "$@"' <PYTHON> -u -m submitit.core._submit <LOGS>


# teardown
code=$?
if [ $code -ne 0 ]; then trap '' TERM; <PYTHON> -m launch.backends.slurm.start_preempted <LOGS>; fi
exit $code