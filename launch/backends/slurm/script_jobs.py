"""Jobs submitted with `sbatch slurm/multi_node.sh OVERRIDES` write nothing into their run folder until they start.
The launcher finds them in the queue by the arguments Slurm keeps for them, so that while one waits (or is held,
or runs), a second submission of its run is refused as it is for the launcher's own jobs
(launch.backends.slurm.submit).
One squeue call per launcher process, whatever the number of sweep points. Torch-free."""
from __future__ import annotations

import functools
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from launch.backends.slurm import commands
from launch.backends.slurm.commands import QueuedScript, SlurmUnavailable

SCRIPT = "multi_node.sh"


@functools.cache
def _queued() -> tuple[QueuedScript, ...]:
    try:
        jobs = commands.queued_scripts()
    except SlurmUnavailable:
        return ()
    return tuple(j for j in jobs if j.command and Path(j.command[0]).name == SCRIPT)


@functools.cache
def _run_dir(job: QueuedScript) -> Path | None:
    """The folder the job will train in: its overrides composed as multi_node.sh composes them, from the folder it
    was submitted from. None when they do not compose (the job will say why when it starts)."""
    from hydra import compose

    try:
        cfg = compose(config_name="config", overrides=[*job.command[1:], "cluster=srun"], return_hydra_config=True)
        return (Path(job.workdir) / str(cfg.hydra.run.dir)).resolve()
    except (HydraException, OmegaConfBaseException):
        return None


def script_job(run_dir: Path, known: tuple[str, ...] = ()) -> QueuedScript | None:
    """A multi_node.sh job of this user that will train in `run_dir`, other than the jobs in `known`."""
    target = run_dir.resolve()
    return next((j for j in _queued() if j.job_id not in known and _run_dir(j) == target), None)
