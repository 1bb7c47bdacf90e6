#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=12
#SBATCH --error=<LOGS>/%j_0_log.err
#SBATCH --gpus-per-node=8
#SBATCH --job-name=gpt2_124m-fsdp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output=<LOGS>/%j_0_log.out
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=60

# setup
export GPTLAUNCH_ATTEMPT_START=$(date +%s.%N)

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <LOGS>/%j_%t_log.out --error <LOGS>/%j_%t_log.err --kill-on-bad-exit=1 --cpus-per-task=12 '--container-image=nvcr.io#nvidia/pytorch:24.05-py3' --container-mounts=/scratch/data:/data,/golden:/golden --container-workdir=/golden bash -c 'trap "" TERM USR2; exec "$0" "$@"' python -u -m submitit.core._submit <LOGS>


# teardown
code=$?
if [ $code -ne 0 ]; then trap '' TERM; <PYTHON> -m launch.backends.slurm.start_preempted <LOGS>; fi
exit $code