"""The run's configuration as one typed tree, `RunConfig`, and the one place that builds it from what Hydra
composed. Parsed once on the login node (planning) and once in each rank (from RUN_DIR/config.yaml); every
component then receives its own typed section.

The launcher's tree (launch.launch_config.LaunchConfig) is this one with the sections only the launcher and its
backends read (which scheduler runs the ranks, what a sweep may cost): gpt/ knows no scheduler. Every function here
takes the tree's class (`root`); a RunConfig read from a launch's config leaves those sections out. The launcher's
tree is the schema of configs/: `register(root)` stores it in Hydra's ConfigStore as `schema`, the first entry of
configs/config.yaml's defaults list, so Hydra refuses an unknown key or a value of the wrong type while it composes.
Defaults live in the dataclasses; the YAML files hold what a preset changes. Torch-free."""
from __future__ import annotations

import dataclasses
import functools
import os
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from gpt.config.data import DataConfig
from gpt.config.divergence import DivergenceConfig
from gpt.config.notify import NotifyConfig
from gpt.config.evaluation import EvalConfig
from gpt.config.launcher import LauncherConfig
from gpt.config.model import ModelConfig
from gpt.config.names import check_run_name, one_line
from gpt.config.profile import ProfileConfig
from gpt.config.parse import KEY, REQUIRED, default_of, describe, key_of, known_keys, moved_to, section, to_plain
from gpt.config.report import ReportConfig
from gpt.config.sections import (CheckpointConfig, DebugConfig, HealthConfig, PreemptionConfig, RendezvousConfig,
                                 StragglerConfig, WatchdogConfig)
from gpt.config.strategy import ParallelConfig, StrategyConfig
from gpt.config.tracking import TrackingConfig
from gpt.config.train import TrainConfig
from gpt.errors import ConfigError, UserError
from gpt.hf.folder import check_init_choice
from gpt.parallel.traits import REGISTRY, traits_of

SCHEMA = "schema"  # its name in the ConfigStore, and in configs/config.yaml's defaults list


@dataclass(frozen=True)
class RunConfig:
    name: str  # the job name, and the run's unless it has one (configs/config.yaml: <model>-<strategy>)
    # the run (key `run`): one folder (runs/<run>) from its first submission to its last step
    run_name: str = field(metadata={KEY: "run"})
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    strategy: StrategyConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    rendezvous: RendezvousConfig = field(default_factory=RendezvousConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    stragglers: StragglerConfig = field(default_factory=StragglerConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # downstream tasks beside the validation loss
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)  # a non-finite or spiking loss
    notify: NotifyConfig = field(default_factory=NotifyConfig)  # word when an attempt ends
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # traces of chosen steps, memory snapshots
    debug: DebugConfig = field(default_factory=DebugConfig)
    seed: int = 1337  # initialisation, the order of the batches, every rank's random number generators
    # auto: continue from the newest usable checkpoint in the run folder (none there: start fresh); none: start
    # fresh, refused when the folder holds checkpoints; PATH: initialise from another run's checkpoint (or a run
    # folder: its newest that holds its optimizer state), only while this run has none
    resume: str = "auto"
    # none, or hf:PATH: initialise the weights from a local Hugging Face folder (GPT-2, LLaMA, Mistral, Qwen2 or
    # Mixtral; its config.json fills model.*), like resume=PATH only while this run has no checkpoint of its own
    # (docs/export.md)
    init: str = "none"
    # the run folder is the user's alone (0700) and nothing in it writable by others; true: the group may read it
    # (0750), to look at a colleague's run or report; nobody else, and no group may write
    share_with_group: bool = False
    # one key per knob: keys this section no longer has, refused with the key to use
    MOVED: ClassVar[dict[str, str]] = {"metrics": "stragglers.KEY (metrics.straggler_windows is stragglers.windows)"}

    def validate(self) -> None:
        # paths (resume=PATH, init=hf:PATH, eval.tasks) are checked by planning, once: not at every read of
        # config.yaml, by a process in another folder or after the folder a run started from was purged
        check_init_choice(self.init, self.resume)
        traits_of(self.strategy.name).check(self.strategy)
        self.eval.check_interval(self.train.eval_interval)
        self.launcher.check_rungs(self.train.eval_interval)
        check_run_name(self.run_name)
        one_line("name", self.name)  # the job's name

    def keys_read(self) -> dict[str, tuple[str, ...]]:
        """The sections that are the union of their presets' keys, and the keys the chosen preset reads."""
        return {"strategy": traits_of(self.strategy.name).keys_read}

    @classmethod
    def moved_in_place(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved config.yaml with its moved keys where this tree has them (a larger tree adds its own)."""
        return moved_keys_in_place(saved)


Root = TypeVar("Root", bound=RunConfig)


def run_config(cfg: Any, root: type[Root] = RunConfig) -> Root:
    """The typed tree of a composed config (a DictConfig, or the plain dicts of a config.yaml), checked. A
    RunConfig leaves out the sections of a larger tree (the launcher's) that are not its own."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if OmegaConf.is_config(cfg):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as e:  # an interpolation that does not resolve, a value never given
            raw = OmegaConf.to_container(cfg, resolve=False)
            for part in e.full_key.split("."):
                raw = raw.get(part) if isinstance(raw, dict) else None
            raise ConfigError(e.full_key, raw, str(e).splitlines()[0]) from None
    if root is RunConfig and isinstance(cfg, dict):
        own = {key_of(f) for f in dataclasses.fields(RunConfig)}
        cfg = {k: v for k, v in cfg.items() if k in own}
    return section(root, "", cfg)


def load(path: Path, root: type[Root] = RunConfig) -> Root:
    """A run folder's config.yaml (written by `save`): the one reader of it outside planning, for the ranks, their
    task wrappers, srun's launcher and the login-node commands. Read once per process while the file stays the same
    (an atomic rewrite by a later launch is read again); a file that cannot be read or parsed is one UserError."""
    try:
        stat = Path(path).stat()
    except OSError as e:
        raise _unreadable(path, e.strerror or str(e)) from None
    return _load(str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size, root)


@functools.lru_cache(maxsize=64)
def _load(path: str, inode: int, mtime_ns: int, size: int, root: type[Root]) -> Root:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    try:
        cfg = OmegaConf.load(path)
    except OSError as e:
        raise _unreadable(path, e.strerror or str(e)) from None
    except (YAMLError, OmegaConfBaseException) as e:
        raise _unreadable(path, f"not YAML: {str(e).splitlines()[0]}") from None
    try:
        saved = OmegaConf.to_container(cfg)
        return run_config(OmegaConf.create(root.moved_in_place(saved) if isinstance(saved, dict) else saved), root)
    except UserError as e:
        raise _unreadable(path, str(e)) from None


def moved_keys_in_place(saved: Any) -> Any:
    """A config.yaml saved before a key moved (one key per knob: strategy.pp is parallel.pp,
    strategy.activation_checkpointing is train.activation_checkpointing, metrics.straggler_X is stragglers.X) reads
    as it was meant: a run folder stays readable, resumable and reportable. A command that names an old key is still
    refused with the key to use. launcher.detach, .snapshot and .pack are the launcher's own section's now
    (hydra.launcher), which a run's config does not hold: they are left out."""
    if not isinstance(saved, dict):
        return saved
    if isinstance(saved.get("launcher"), dict):
        for key in LauncherConfig.MOVED:
            saved["launcher"].pop(key, None)
    if isinstance(saved.get("metrics"), dict):
        old = saved.pop("metrics")
        saved.setdefault("stragglers", {k.removeprefix("straggler_"): v for k, v in old.items()})
    if not isinstance(saved.get("strategy"), dict):
        return saved
    strategy = saved["strategy"]
    if "pp" in strategy:
        stages = strategy.pop("pp")
        parallel = saved.setdefault("parallel", {})
        if parallel.get("pp", 1) == 1:
            parallel["pp"] = stages
    if strategy.pop("activation_checkpointing", False) is True:
        train = saved.setdefault("train", {})
        if train.get("activation_checkpointing", "none") == "none":
            train["activation_checkpointing"] = "full"
    return saved


def _unreadable(path: Path | str, what: str) -> UserError:
    return UserError(f"the run's config {path} cannot be read ({what}); the launcher writes it: run the launch "
                     "command again to rewrite it")


def config_plain(run: RunConfig) -> dict[str, Any]:
    """The resolved, checked config as configs/ names its keys. The sections that are the union of their presets'
    keys (strategy, the launcher's cluster) hold only the keys their preset reads."""
    plain = to_plain(run)
    for key, read in run.keys_read().items():
        plain[key] = {k: v for k, v in plain[key].items() if k in read}
    return plain


def config_text(run: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(config_plain(run))


def save(run: RunConfig, path: Path) -> None:
    """The config every rank of the run reads (config_text)."""
    text = config_text(run)
    if path.is_file() and path.read_text() == text:  # under the stock launcher every task of a job writes it
        return
    # atomic, under a name no other writer has (other tasks read it meanwhile, on hosts whose pids may collide)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def field_at(path: str, root: type[RunConfig] = RunConfig) -> Any:
    """The type of a dotted key of the tree ("train.lr": float; "train.betas[1]": the list's), None when the tree
    has no such key."""
    tp: Any = root
    for part in path.split("[")[0].split("."):
        if not dataclasses.is_dataclass(tp):
            return tp if typing.get_origin(tp) is dict or tp is Any else None
        fields = {key_of(f): f for f in dataclasses.fields(tp)}
        if part not in fields:
            return None
        tp = typing.get_type_hints(tp)[fields[part].name]
    return tp


def valid_for(path: str, root: type[RunConfig] = RunConfig) -> str:
    """What a key accepts, or which keys its section has when it has no such key: for messages about values that
    never reach the tree (Hydra refuses them while composing)."""
    tp = field_at(path, root)
    if tp is not None and "[" in path:  # an element: train.betas[1]
        return describe(typing.get_args(tp)[0])
    if tp is not None:
        return describe(tp)
    holder = path.rpartition(".")[0]
    tp = field_at(holder, root) if holder else root
    if dataclasses.is_dataclass(tp):
        return moved_to(tp, path.rpartition(".")[2]) or known_keys(tp, holder)
    return "a key of the config (python -m launch --cfg job lists them)"


def hydra_schema(root: type[RunConfig]) -> Any:
    """The tree as a typed OmegaConf node: typed values (an int key refuses 'abc'), closed sections (an unknown key is
    refused), open mappings where any key goes (strategy.config, a job's extra flags), defaults from the dataclasses."""
    return _node(root, REQUIRED)


def _node(tp: Any, default: Any) -> Any:
    from omegaconf import AnyNode, BooleanNode, DictConfig, FloatNode, IntegerNode, ListConfig, OmegaConf, StringNode

    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        content = {key_of(f): _node(hints[f.name], getattr(default, f.name) if dataclasses.is_dataclass(default)
                                    else default_of(f)) for f in dataclasses.fields(tp)}
        node = OmegaConf.create(content)
        OmegaConf.set_struct(node, True)
        return node
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = False
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) > 1:  # e.g. float | str: validate() judges; a list default (cluster.setup) stays a list
            return ListConfig(default) if isinstance(default, list) else AnyNode(default)
        tp, optional = options[0], len(options) < len(args)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        return ListConfig(list(default), element_type=args[0], is_optional=optional)
    if origin is dict:
        node = DictConfig(dict(default), is_optional=optional)
        OmegaConf.set_struct(node, False)
        return node
    nodes = {int: IntegerNode, float: FloatNode, bool: BooleanNode, str: StringNode}
    return nodes[tp](default, is_optional=optional) if tp in nodes else AnyNode(default)


def register(root: type[RunConfig]) -> None:
    """The schema in Hydra's ConfigStore, before Hydra composes configs/ (the app, and tests that compose), and one
    strategy=NAME option per registered strategy (gpt.parallel.traits): its name and what its preset sets."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name=SCHEMA, node=hydra_schema(root), provider="gptlaunch")
    for name, traits in REGISTRY.items():
        store.store(group="strategy", name=name, node={"strategy": {"name": name}, **traits.preset},
                    package="_global_", provider="gptlaunch")
