"""cluster=slurm: every sweep point is a Slurm job with its own resources, submitted from this machine (a login
node) through submitit, after every check that can be made against the cluster (sinfo) and the budget."""
from __future__ import annotations

from gpt.model.flops import memory_gib
from launch.backends import Backend, Queue
from launch.backends.slurm import commands, detached, eval_job, partitions, submit, time_limit, wait
from launch.backends.slurm.resources import SlurmResources


class SlurmQueue(Queue):
    """Slurm's queue: the Slurm modules' own functions."""

    live_job = staticmethod(submit.live_job)
    submit_all = staticmethod(submit.submit_jobs)
    wait = staticmethod(wait.wait)
    submit_report = staticmethod(detached.submit_report_job)
    submit_search = staticmethod(detached.submit_search_job)
    print_follow_up = staticmethod(detached.print_follow_up)
    after_save_hook = staticmethod(eval_job.after_save_hook)
    job_state = staticmethod(commands.job_standing)

    def standings(self, job_ids):
        return {j: commands.standing(i) for j, i in commands.job_infos(job_ids).items()} if job_ids else {}

    def cancel(self, job_ids, signal=None):
        if job_ids:
            commands.run("scancel", *([f"--signal={signal}"] if signal else []), *job_ids, timeout=60)


class SlurmBackend(Backend):
    name = "slurm"
    queue = SlurmQueue()

    def check(self, run):
        partitions.require_slurm()
        resources = SlurmResources.from_run(run)
        part = partitions.check_against_cluster(resources, partitions.read_partitions())
        resources = partitions.resolve_cpus(resources, part)
        # the run's config records what was asked for (the ranks allow for the warning's lead)
        return run.with_cluster(cpus_per_task=resources.cpus_per_task,
                                signal_delay_s=resources.signal_delay_s), resources

    def preemption_grace_s(self, run):
        """The GraceTime of the job's partition, or of its QOS where the cluster preempts by QOS, where its
        PreemptMode cancels or requeues it (suspending, gang scheduling or none: it is not stopped)."""
        try:
            partition = run.cluster.partition or next(
                (p.name for p in partitions.read_partitions().values() if p.default), None)
            settings = commands.preemption_settings(partition, run.cluster.qos) if partition else None
        except commands.SlurmUnavailable:  # a warning's input: planning goes on without it
            return None
        if settings is None:
            return None
        where, mode, grace = settings
        if grace is None or not {"CANCEL", "REQUEUE"} & set(mode.upper().split(",")):
            return None
        return grace, f"{where}: PreemptMode={mode}, GraceTime={grace} s"

    def time_limit_lines(self, run, times):
        return time_limit.time_limit_lines(SlurmResources.from_run(run), times)

    def device(self, run):
        return "cuda" if run.cluster.node_gpus > 0 else "cpu"  # the GPUs it asks for, whatever this node has

    def device_memory_gib(self, run, device):
        """A GPU's by the type the job asks for (--gres=gpu:a100:4, --constraint=a100); on CPU nodes each rank's
        share of --mem (--mem=0: of the node's whole memory, as sinfo tells it). None when the job names neither."""
        cluster = run.cluster
        if device == "cuda":
            gres = str(cluster.gres or cluster.sbatch.get("gres") or "").split(":")
            names = [gres[1]] if len(gres) > 2 else []
            return next((m for m in map(memory_gib, [*names, cluster.constraint]) if m), None)
        mem = partitions.mem_mb(cluster.mem) if cluster.mem else None
        if mem == 0:  # Slurm's --mem=0: all of each node's memory, not none
            mem = partitions.node_mem_mb(cluster, partitions.read_partitions())
        return mem / 1024 / cluster.tasks_per_node if mem else None
