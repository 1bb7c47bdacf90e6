#!/bin/bash

# Parameters
#SBATCH --account=proj42
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=12
#SBATCH --error=<LOGS>/%j_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=gpt2_124m-fsdp
#SBATCH --mem=480G
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output=<LOGS>/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=720

# setup
export GPTLAUNCH_ATTEMPT_START=$(date +%s.%N)
module load cuda/12.4
source ~/venv/bin/activate

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <LOGS>/%j_%t_log.out --error <LOGS>/%j_%t_log.err --kill-on-bad-exit=1 --cpus-per-task=12 bash -c 'trap "" TERM USR2; exec "$0" "$@"' <PYTHON> -u -m submitit.core._submit <LOGS>


# teardown
code=$?
if [ $code -ne 0 ]; then trap '' TERM; <PYTHON> -m launch.backends.slurm.start_preempted <LOGS>; fi
exit $code