#!/bin/bash
# One gptlaunch training run as a plain sbatch job. Submit it from the repository (the job runs where you
# submit it, and every node must see that folder); its arguments are Hydra overrides:
#
#   sbatch slurm/multi_node.sh model=tiny strategy=ddp
#   sbatch --nodes=2 slurm/multi_node.sh model=llama_124m strategy=deepspeed strategy.stage=2 train.max_steps=5000
#
# Ask for no more nodes than the partition has: `sinfo -s` shows each partition's nodes (NODES(A/I/O/T), T the
# total). Slurm accepts a larger request on many sites, and the job then waits for ever (squeue's reason:
# PartitionNodeLimit or Resources).
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 --cpus-per-task=12 slurm/multi_node.sh model=gpt2_124m \
#       strategy=fsdp train=gpu train.global_batch_size=128
#
# The batch host plans the run (`python -m launch cluster=srun`: every check, the resolved config written to
# the run folder), then srun starts one rank per task: one task per GPU on GPU nodes (--ntasks-per-node must
# equal --gpus-per-node), or --ntasks-per-node ranks on CPU nodes. The run folder is runs/<run> (run=NAME;
# default model-strategy): a requeued job, and the same command submitted again after any stop, continue it.
#
# A site's srun flags, environment (a MASTER_ADDR/MASTER_PORT it needs included), master hostname suffix and
# container come from its profile or the command line: site=NAME, cluster.srun_args, cluster.env,
# cluster.master_host_suffix, cluster.container.* (docs/sites.md).
#
# Edit the defaults below, or override any of them on the sbatch command line (which wins).
#SBATCH --job-name=gptlaunch
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#   GPU nodes: one task per GPU, each with its share of the node's CPUs (data loading, NCCL's proxy thread, the
#   checkpoint writer and the watchdog run beside the GPU), e.g. on nodes of 8 GPUs and 96 cores:
#   --gpus-per-node=8 --ntasks-per-node=8 --cpus-per-task=12; --gpu-bind=closest (or none) works too.
##SBATCH --gpus-per-node=8
#SBATCH --time=01:00:00
##SBATCH --partition=gpu
##SBATCH --account=my_account
#   Preemption: Slurm may requeue the job, and warns the batch shell 120 s before the time limit (the warning
#   can come up to 30 s early). The script passes the warning on to every rank; the ranks save a checkpoint and
#   requeue the job, which (same job id, same run folder) resumes from it.
#SBATCH --requeue
#SBATCH --signal=B:USR2@120
#   A requeued job appends to its log instead of overwriting it. (%x: job name, %j: job id; the log goes to the
#   folder you submit from, which exists: Slurm does not create folders for logs.)
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail
export GPTLAUNCH_ATTEMPT_START=$(date +%s.%N)  # this attempt's start, for the start-up breakdown in attempts.jsonl
# Slurm's warning (USR2) or a stop (TERM) may come at any moment, even now: keep it, and pass it on below once
# the launcher handles it.
PENDING=""
trap 'PENDING=USR2' USR2
trap 'PENDING=TERM' TERM

die() { echo "multi_node.sh: error: $*" >&2; exit 2; }

# --- the environment ------------------------------------------------------------------------------------
[ -n "${SLURM_JOB_ID:-}" ] || die "run me with sbatch (or inside salloc): SLURM_JOB_ID is not set"
command -v srun >/dev/null || die "srun is not on PATH on the batch host ($(hostname -s))"
PYTHON="${GPTLAUNCH_PYTHON:-python}"   # the job inherits your PATH: activate the venv before sbatch
command -v "$PYTHON" >/dev/null || die "$PYTHON is not on PATH on $(hostname -s); activate gptlaunch's environment before sbatch, or set GPTLAUNCH_PYTHON"
cd "${SLURM_SUBMIT_DIR:-.}" || die "cannot enter the submit folder $SLURM_SUBMIT_DIR from $(hostname -s)"
# --gpus-per-node asked for one task per GPU; --exclusive (or --gres) may hand a job every GPU of its nodes unasked,
# which the launcher only warns about
if [ -n "${SLURM_GPUS_PER_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE:-0}" != 0 ] && [ -n "${SLURM_NTASKS_PER_NODE:-}" ] &&
   [ "${SLURM_NTASKS_PER_NODE}" != "${SLURM_GPUS_ON_NODE}" ]; then
  die "${SLURM_GPUS_ON_NODE} GPU(s) per node but --ntasks-per-node=${SLURM_NTASKS_PER_NODE}: one task per GPU needs --ntasks-per-node=${SLURM_GPUS_ON_NODE}"
fi
# Slurm 22.05+ srun does not take --cpus-per-task from sbatch: pass it on to every srun of this job.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
if [ "${SLURM_GPUS_ON_NODE:-0}" != 0 ] && [ "${SLURM_CPUS_PER_TASK:-1}" = 1 ]; then
  echo "multi_node.sh: warning: each GPU rank gets 1 CPU, shared by its data loading, NCCL's proxy thread and the checkpoint writer; ask for its share of the node with --cpus-per-task" >&2
fi
echo "multi_node.sh: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES} node(s): ${SLURM_JOB_NODELIST}; in $(pwd)"
# torchrun-style variables here came from the shell that ran sbatch: Slurm's own place the ranks.
inherited=$(for v in RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT; do [ -n "${!v+x}" ] && echo -n "$v "; done)
if [ -n "$inherited" ]; then
  echo "multi_node.sh: warning: ignoring ${inherited}inherited from the submitting shell; Slurm's variables place the ranks (a site that needs its own: cluster.env.MASTER_ADDR=...)" >&2
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
fi

# --- plan here, run everywhere ----------------------------------------------------------------------------
# In the background, so that this shell can pass Slurm's warning (USR2) and stop (TERM) signals on: bash runs
# a trap only after its foreground child ends, but interrupts `wait` at once.
# The launcher starts with both signals ignored (its start-up must not die of one); it handles them once srun runs.
(trap '' USR2 TERM; exec "$PYTHON" -m launch cluster=srun "$@") &
LAUNCH=$!
catches() {  # does the launcher handle signal $1 yet? (SigCgt in /proc/PID/status)
  local mask; mask=$(awk '/^SigCgt:/ {print $2}' /proc/$LAUNCH/status 2>/dev/null) || return 1
  [ -n "$mask" ] && (( (16#$mask >> ($1 - 1)) & 1 ))
}
trap 'PENDING=USR2' USR2
trap 'PENDING=TERM' TERM
while true; do
  if [ -n "$PENDING" ] && catches "$(kill -l "$PENDING")"; then kill -"$PENDING" $LAUNCH 2>/dev/null; PENDING=""; fi
  if [ -n "$PENDING" ]; then  # not yet: look again in a moment
    sleep 0.5 & wait $! 2>/dev/null
    kill -0 $LAUNCH 2>/dev/null && continue
  fi
  wait $LAUNCH
  code=$?
  # >128: wait was interrupted by a trapped signal while the launcher still runs
  if [ $code -gt 128 ] && kill -0 $LAUNCH 2>/dev/null; then continue; fi
  break
done
exit $code
