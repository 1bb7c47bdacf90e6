"""What the ranks' srun step gets beyond its shape, for cluster=slurm (the sbatch script submitit writes) and
cluster=srun (slurm/multi_node.sh) alike: a site's srun flags, its environment, its master address, and the
container the ranks run in (pyxis: srun flags; apptainer: a prefix of the rank's command). Torch-free."""
from __future__ import annotations

import os
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

from launch.backends.cluster_config import ClusterConfig
from gpt.errors import UserError

CONTAINER_PYTHON = "python"  # the image's: the submitting host's interpreter path means nothing inside it


@dataclass(frozen=True)
class RankStep:
    srun_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    master_host_suffix: str | None = None
    image: str | None = None
    runtime: str = "pyxis"
    mounts: tuple[str, ...] = ()

    @classmethod
    def from_cluster(cls, cluster: ClusterConfig) -> RankStep:
        c = cluster.container
        return cls(srun_args=tuple(cluster.srun_args), env=tuple(sorted(cluster.env_vars.items())),
                   master_host_suffix=cluster.master_host_suffix, image=c.image, runtime=c.runtime,
                   mounts=tuple(c.mounts))

    def mounting(self, *folders: Path) -> RankStep:
        """With `folders` (the submit folder, the run folders with their checkpoints, submitit's folder) mounted at
        the same path; a folder inside one already mounted adds nothing."""
        if self.image is None:
            return self
        paths: list[str] = []
        for folder in sorted({mountable(Path(f).resolve(), self.runtime) for f in folders}, key=len):
            if not any(folder == p or folder.startswith(p.rstrip("/") + "/") for p in paths):
                paths.append(folder)
        own = {m.split(":")[0] for m in self.mounts}
        return RankStep(self.srun_args, self.env, self.master_host_suffix, self.image, self.runtime,
                        (*self.mounts, *(f"{p}:{p}" for p in paths if p not in own)))

    def srun_flags(self, workdir: Path) -> list[str]:
        flags = list(self.srun_args)
        if self.image is not None and self.runtime == "pyxis":
            flags.append(f"--container-image={self.image}")
            if self.mounts:
                flags.append(f"--container-mounts={','.join(self.mounts)}")
            flags.append(f"--container-workdir={workdir}")
        return flags

    def command(self, python: str, workdir: Path) -> list[str]:
        """The rank's interpreter, inside the container when there is one."""
        if self.image is None:
            return [python]
        if self.runtime == "pyxis":
            return [CONTAINER_PYTHON]
        binds = ["--bind", ",".join(self.mounts)] if self.mounts else []
        return ["apptainer", "exec", "--nv", *binds, "--pwd", str(workdir), self.image, CONTAINER_PYTHON]

    def exports(self) -> list[str]:
        """Shell lines for the batch script: the site's variables, then the master address from its host suffix."""
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.env]
        if self.master_host_suffix and "MASTER_ADDR" not in dict(self.env):
            suffix = shlex.quote(self.master_host_suffix)
            lines.append(f'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"{suffix}')
        return lines

    def environ(self, first_host: str) -> dict[str, str]:
        """The same, as variables for an srun started from Python (cluster=srun)."""
        env = dict(self.env)
        if self.master_host_suffix and "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = first_host + self.master_host_suffix
        return env


def mountable(folder: Path, runtime: str) -> str:
    """The folder, or the nearest folder above it that a mount list can name: pyxis's --container-mounts and
    apptainer's --bind split at ',' between mounts and at ':' inside one, and pyxis has no escape for either (enroot
    also splits its mount lines at spaces). Mounted at the same path, the folder above holds it: a sweep's points
    are named `nodes=2,train.lr=0.001`."""
    for candidate in (folder, *folder.parents):
        if candidate != candidate.parent and not any(c in str(candidate) for c in ",:") \
                and not any(c.isspace() for c in str(candidate)):
            return str(candidate)
    raise UserError(f"{folder} cannot be mounted in the container (cluster.container.runtime={runtime}): pyxis and "
                    "apptainer split their list of mounts at ',' and ':' (pyxis at spaces too), and every folder above "
                    "it has one; submit from, and keep the runs in, a folder whose path has none")


def workdir() -> Path:
    """Where the ranks start: the submit folder, which holds the code, configs/, data/ and runs/."""
    return Path(os.getcwd()).resolve()


def ignoring(signals: list[signal.Signals]) -> list[str]:
    """The command prefix that starts a task with `signals` ignored until its handlers are in place (an ignored signal
    stays so across exec): one that came in its first second would kill it, and a job that ended inside a
    preemption's grace time is not requeued by Slurm. The task wrapper asks Slurm whether it missed a preemption."""
    names = " ".join(s.name.removeprefix("SIG") for s in signals)
    return ["bash", "-c", f'trap "" {names}; exec "$0" "$@"'] if signals else []
