"""Turn a checked config into a plan, before any process starts or any job is submitted: the device and layout
the ranks will run, the prepared data, and the resolved config in the run folder. Torch-free: a local run's GPUs
are counted with torch imported only then."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import to_absolute_path

from gpt.config import schema
from launch import launch_config
from launch.launch_config import LaunchConfig
from gpt.config.data import DataConfig
from gpt.config.model import ModelConfig
from gpt.config.train import TrainConfig
from gpt.data import check_tokenizer_vocab, check_vocab, ensure_prepared, is_prepared
from gpt.checkpoint.store import (check_fingerprint, list_checkpoints, newest_full, read_meta, resumable,
                                  weights_alone)
from gpt.errors import ConfigError, UserError
from gpt.hf.folder import FILLED, PREFIX, check_init, filled_model
from gpt.parallel import plan_layout
from gpt.parallel.traits import check_loadable
from gpt.parallel.layout import ParallelDims
from gpt.run_folder import RunFolder
from launch.backends import Backend
from launch.planning.memory_fit import Device, fit
from launch.planning.save_time import check_save_time
from launch.planning.time_limit import check_time_limit
from launch.recovery.out_of_memory import keep_smaller_micro_batch
from launch.run.identity import flat, newest_step
from launch.planning.shared_gpu import rank_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    run_dir: Path
    nodes: int
    tasks_per_node: int
    prepare_job: DataConfig | None = None  # data.prepare_on=job: the data a Slurm job prepares before this run's


    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def planned_device(run: LaunchConfig, backend: Backend) -> str:
    """The device the ranks will compute on: train.device, or for `auto` what the backend says its ranks get (a
    submitted job has the GPUs it asks for, whatever this login node has)."""
    return run.train.device if run.train.device != "auto" else backend.device(run)


def plan_layout_of(run: LaunchConfig, backend: Backend) -> tuple[Device, TrainConfig, ParallelDims]:
    """What needs the sections together before the data: the nodes, the device, the attention kernel, the layout
    and the batch. Returns the planned device with its memory (cluster.gpu_memory_gb on GPUs when set, else what
    the backend knows: a GPU by its name, a node's memory), the train section resolved to it, and the layout (what
    the dry run, launch.dry_run, plans too)."""
    nodes, per_node = run.nodes, run.cluster.tasks_per_node
    if not isinstance(nodes, int) or not isinstance(per_node, int):  # srun's auto, unresolved outside a job
        raise ConfigError("nodes" if not isinstance(nodes, int) else "cluster.tasks_per_node",
                          nodes if not isinstance(nodes, int) else per_node, "a positive integer")
    device = planned_device(run, backend)
    stated = device == "cuda" and run.cluster.gpu_memory_gb
    memory = float(run.cluster.gpu_memory_gb) if stated else backend.device_memory_gib(run, device)
    memory = rank_memory(run, device, nodes * per_node, memory)
    train = dataclasses.replace(run.train, device=device)  # the presets check their options against it
    train.check_attention(device)
    train.check_fp8(device)
    dims = plan_layout(run.strategy, run.parallel, run.model, nodes * per_node, per_node, train)
    train.per_rank_batch(dims.dp) if train.micro_batch_size == "auto" else train.micro_batches(dims.dp)
    train.check_cuda_graphs(dims.dp)  # with micro_batch_size=auto: once chosen, by the fit check
    return Device(device, memory), train, dims


def make_plan(run: LaunchConfig, run_dir: Path, backend: Backend, live_job: str | None = None,
              keep_config: bool = False) -> Plan:
    """Check what needs the sections together (device, layout, batch, vocabulary), prepare the data, and write the
    resolved config to the run folder; unless the run's job `live_job` waits or runs: it trains with the folder's
    config, which this command must then equal; or `keep_config` (a finished run: its status and report describe what
    it ran). `run`'s paths are absolute (absolute_paths); `backend` is the one planning chose
    (launch.backends.backend_for), asked once for the device and its memory (plan_layout_of)."""
    checked_paths(run, run_dir)
    device, train, dims = plan_layout_of(run, backend)
    if run.model.vocab_size:  # before the data is prepared: a layout that cannot fit is refused first
        train = fit(run.strategy, run.model, train, dims, device)
    data = run.data
    if data.prepare_on == "job" and run.cluster.name == "local":
        raise ConfigError("data.prepare_on", "job", "login with cluster=local (the data is prepared here), or "
                          "cluster=slurm")
    # a job prepares the data, before the run's, where the backend queues jobs and the data is not yet prepared the
    # same way; under srun (sbatch slurm/multi_node.sh) the launcher already runs inside the job: it prepares here
    prepare_job = data if data.prepare_on == "job" and backend.queue and not is_prepared(data) else None
    model = run.model
    if prepare_job:
        check_tokenizer_vocab(data, run.model.vocab_size)
    else:
        vocab = check_vocab(run.model.vocab_size, ensure_prepared(data, run.model.vocab_size))
        if not run.model.vocab_size:  # the model takes the tokenizer's
            model = dataclasses.replace(run.model, vocab_size=vocab)
            train = fit(run.strategy, model, train, dims, device)

    check_checkpoint_loads(run, model, run_dir, run.nodes * run.cluster.tasks_per_node)
    train = keep_smaller_micro_batch(run_dir, train, dims.dp)
    train.check_cuda_graphs(dims.dp)  # micro_batch_size=auto, as fit chose it
    if model.vocab_size:
        check_save_time(run, model, train, run_dir, backend, run.nodes * run.cluster.tasks_per_node)
    check_time_limit(run, run_dir, backend)
    # micro_batch_size=auto as chosen: every rank, a requeue and a resumed attempt read this one
    resolved = dataclasses.replace(run, train=dataclasses.replace(
        run.train, micro_batch_size=train.micro_batch_size))
    if live_job is not None:
        check_same_config(resolved, run_dir, live_job)
    elif not keep_config:
        run_dir.mkdir(parents=True, exist_ok=True)
        schema.save(resolved, RunFolder(run_dir).config)
    return Plan(run_dir, run.nodes, run.cluster.tasks_per_node, prepare_job)


def given_model_keys(overrides: list[str]) -> set[str]:
    """The model.* keys a command sets itself (model.KEY=VALUE): with init=hf:PATH, checked against the folder's
    config.json rather than taken from it."""
    keys = (o.lstrip("+~").partition("=")[0] for o in overrides)
    return {k.removeprefix("model.") for k in keys if k.startswith("model.")}


def init_model(run: LaunchConfig, run_dir: Path | None, given: set[str]) -> LaunchConfig:
    """With init=hf:PATH (made absolute by absolute_paths), the model as the folder's config.json has it, but the
    keys in `given`; once the run has a checkpoint of its own, as its config.yaml recorded it then (the folder is
    read no more: a purged one does not stop a requeue or the same command)."""
    if run.init == "none":
        return run
    saved = RunFolder(run_dir).config if run_dir is not None else None
    if saved is not None and saved.is_file() and newest_step(run_dir) is not None:
        model = launch_config.load(saved).model
        return dataclasses.replace(run, model=dataclasses.replace(
            run.model, **{k: getattr(model, k) for k in FILLED if k not in given}))
    return dataclasses.replace(run, model=filled_model(run.init, run.model, given))


KEYWORDS = ("auto", "none", "false", "null")  # resume's values that name no path (gpt.train.resume)


def resolved(run: LaunchConfig, run_dir: Path | None, overrides: list[str]) -> LaunchConfig:
    """The parsed config as every part of planning reads it, resolved once: its paths absolute (absolute_paths),
    and with init=hf:PATH its model filled from the folder but for the model keys the command's `overrides` set
    (init_model; `run_dir`: the run's folder, None for a dry run)."""
    run = absolute_paths(run)
    return init_model(run, run_dir, given_model_keys(overrides))


def absolute_paths(run: LaunchConfig) -> LaunchConfig:
    """Every path the ranks read (the data's, eval.tasks, init=hf:PATH, resume=PATH, train.compile_cache_dir), made
    absolute from where the launcher was started, once, before planning reads any: config.yaml means them in any
    process and folder."""
    def opt(p: str | None) -> str | None:
        return to_absolute_path(p) if p else p

    data = run.data
    sources = [dataclasses.replace(s, text_path=to_absolute_path(s.text_path), dir=to_absolute_path(s.dir),
                                   val_path=opt(s.val_path)) for s in data.sources]
    data = dataclasses.replace(data, text_path=to_absolute_path(data.text_path), dir=to_absolute_path(data.dir),
                               val_path=opt(data.val_path), tokenizer_file=opt(data.tokenizer_file), sources=sources)
    tasks = [to_absolute_path(t) for t in run.eval.tasks]
    init = run.init if run.init == "none" else f"{PREFIX}{to_absolute_path(run.init.removeprefix(PREFIX))}"
    resume = run.resume if run.resume.lower() in KEYWORDS else to_absolute_path(run.resume)
    cache = run.train.compile_cache_dir and to_absolute_path(str(Path(run.train.compile_cache_dir).expanduser()))
    return dataclasses.replace(run, data=data, init=init, resume=resume,
                               eval=dataclasses.replace(run.eval, tasks=tasks),
                               train=dataclasses.replace(run.train, compile_cache_dir=cache))


def checked_paths(run: LaunchConfig, run_dir: Path) -> None:
    """The paths checked here, once, not at each read of config.yaml: the task files always (every attempt scores
    them), the folder or checkpoint the run starts from only while the run has no checkpoint of its own (nothing
    reads them after its first save: a purged folder does not stop a requeue)."""
    run.eval.check_files()
    if newest_step(run_dir) is None:
        if run.resume.lower() not in KEYWORDS and not Path(run.resume).exists():
            raise ConfigError("resume", run.resume, "auto, none, or an existing checkpoint or run folder")
        check_init(run.init, run.model, run.data, run.resume)


def check_checkpoint_loads(run: LaunchConfig, model: ModelConfig, run_dir: Path, world_size: int) -> None:
    """The checkpoint the ranks will load (the run's newest that holds its optimizer, else resume=PATH's, whose
    model must be `model`) in a format this strategy on `world_size` ranks loads: refused here, not by the ranks
    once the job has queued. One whose meta.json cannot be read is left to the ranks, which fall back."""
    newest = newest_step(run_dir)
    own = newest is not None
    if own:
        checkpoints = list_checkpoints(RunFolder(run_dir).checkpoints)
        path = newest_full(checkpoints)
        if path is None and checkpoints and newest < run.train.max_steps:  # more steps, from the weights alone
            raise weights_alone(checkpoints[-1], f"train.max_steps={run.train.max_steps}")
    else:
        path = None if run.resume.lower() in KEYWORDS else resumable(Path(run.resume))
    if path is None:
        return
    try:
        meta = read_meta(path)
    except UserError:
        return
    saved = {k: v for k, v in (meta.get("fingerprint") or {}).items() if k.startswith("model.")}
    # the run's own checkpoints are its record's (launch.run.identity); a vocabulary a job's preparation will give
    # is checked by the ranks
    if not own and saved and model.vocab_size:
        check_fingerprint(path, saved, {f"model.{k}": v for k, v in dataclasses.asdict(model).items()})
    check_loadable(path, meta, run.strategy, world_size)


def check_same_config(run: LaunchConfig, run_dir: Path, job_id: str) -> None:
    """The job trains with the folder's config.yaml: this command may wait for it only if it asks for the same
    (the launcher section aside: what a sweep judges its points by is this command's own business)."""
    path = RunFolder(run_dir).config
    saved = flat(schema.config_plain(launch_config.load(path))) if path.is_file() else {}
    current = flat(schema.config_plain(run))
    keys = [k for k in sorted(set(saved) | set(current)) if not k.startswith("launcher.")]
    changed = [k for k in keys if saved.get(k) != current.get(k)]
    if "cluster.name" in changed:  # another cluster's keys (srun's, slurm's) differ as a matter of course
        changed = [k for k in changed if k == "cluster.name" or not k.startswith("cluster.")]
    changed = [f"{k}: {saved.get(k, '<unset>')!r} in the folder, {current.get(k, '<unset>')!r} here" for k in changed]
    if changed:
        raise UserError(f"the run folder {run_dir} belongs to job {job_id}, which trains with its config.yaml, not "
                        f"this command's ({'; '.join(changed[:6])}). Wait for it (python -m launch.status "
                        f"{run_dir}), or cancel it (python -m launch.cancel {run_dir}) and run this command again")
