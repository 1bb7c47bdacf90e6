"""Resuming: rank 0 chooses the checkpoint (resume=auto, PATH or none), every rank checks it can read it and that it
fits this run (the fingerprint, the data's, the strategy's format, the world size), and every rank loads the same
one. An unusable newest checkpoint is skipped for the one before it, with a warning."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.checkpoint.safe_load import warn_if_foreign
from gpt.checkpoint.store import (check_fingerprint, holds_optimizer, list_checkpoints, read_meta, resumable,
                                  seen_whole, verify, weights_alone)
from gpt.checkpoint.writer import Checkpointer, Unloadable, all_ranks_ok
from gpt.collectives.process_group import DistEnv, from_rank0_object, gather_objects
from gpt.config.model import ModelConfig
from gpt.config.schema import RunConfig
from gpt.config.strategy import StrategyConfig
from gpt.data.loader import TrainBatches
from gpt.errors import UserError
from gpt.parallel.base import Strategy
from gpt.parallel.traits import check_loadable, strategy_keys, traits_of, written_with
from gpt.resilience.faults import Faults
from gpt.train.schedule import settle
from gpt.train.state import TrainState

log = logging.getLogger(__name__)


def what_to_do(newest: Path, strategy: StrategyConfig) -> str:
    """The advice when none of a run's checkpoints loads. Written with other strategy settings than this run's, they
    are most likely whole, in a layout these settings cannot read (their files were checked: verify): continue with
    theirs. Else they are broken."""
    new_run = "start a new run under another name (run=NAME)"
    try:
        meta = read_meta(newest)
    except UserError:
        return f"remove the broken ones, or {new_run}"
    saved = meta.get("strategy_keys") or {}
    mine = {k: v for k, v in strategy_keys(strategy).items() if k in saved}
    if (meta.get("strategy") or "single") != strategy.name or saved != mine:
        return f"they were written with {written_with(meta)}: continue with that, or {new_run}"
    unrecorded = [f"strategy.{k}" for k in traits_of(strategy.name).checkpoint_keys if k not in saved]
    if unrecorded:  # written before meta.json recorded them
        return (f"if they were written with another {' or '.join(unrecorded)}, continue with that; else remove the "
                f"broken ones, or {new_run}")
    return f"remove the broken ones, or {new_run}"


@dataclass(frozen=True)
class Resumed:
    path: Path
    step: int
    eval_pending: bool  # a signal interrupted the evaluation before this checkpoint: the resumed run does it first
    meta: dict[str, Any]  # its meta.json


def continues_own(mode: str, root: Path) -> bool:
    """Whether resume=`mode` continues from the run's own checkpoints under `root` (nothing else then gives the
    weights: a newest one that is unusable falls back to an older one, never to where the run started)."""
    return mode.lower() not in ("none", "false", "null") and bool(list_checkpoints(root))


class Resume:
    def __init__(self, run: RunConfig, env: DistEnv, checkpointer: Checkpointer, faults: Faults, model_cfg: ModelConfig,
                 strategy: Strategy, batches: TrainBatches):
        """Resuming as the run's resume key says, into `strategy` and this rank's training state (`state`: what a
        checkpoint holds besides the weights, which a save writes too)."""
        self.mode, self.checkpointer, self.faults, self.env = run.resume, checkpointer, faults, env
        self.strategy = strategy
        self.state = TrainState(run.seed, run.data.dir, env, model_cfg, run.train, strategy, batches)

    def load(self) -> Resumed | None:
        """resume=auto: the newest usable checkpoint of this run folder (an unusable one is skipped with a
        warning); resume=PATH: that checkpoint (or a run folder's newest), only to initialise a run that has no
        checkpoint of its own yet; resume=none: start over. Rank 0 chooses and every rank loads the same one."""
        mode = self.mode
        if mode.lower() in ("none", "false", "null"):
            return None
        own = list(reversed(list_checkpoints(self.checkpointer.root)))
        explicit = mode.lower() != "auto" and not own
        if mode.lower() != "auto" and own:
            log.info("resume=%s is not used: this run continues from its own checkpoints", mode)
        candidates = [resumable(Path(mode))] if explicit else self.with_optimizer(own)
        if explicit and self.env.is_main:
            warn_if_foreign(candidates[0])
        candidates = [Path(p) for p in from_rank0_object([str(p) for p in candidates])]
        skipped = []
        for i, path in enumerate(candidates):
            problem = self.readable_everywhere(path, newest=i == 0) or self.load_everywhere(path)
            if problem is None:
                resumed = self.restore(path)
                if skipped:
                    log.warning("resumed from %s, older than the unusable newest checkpoint(s): %s", path,
                                "; ".join(skipped))
                return resumed
            if explicit:
                raise UserError(f"cannot resume from {path}: {problem}")
            log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, problem)
            self.checkpointer.unusable.add(path)
            skipped.append(f"{path.name}: {problem}")
        if skipped:
            raise UserError(f"no usable checkpoint in {self.checkpointer.root}: " + "; ".join(skipped) + "; " +
                            what_to_do(candidates[0], self.strategy.cfg))
        return None

    def with_optimizer(self, own: list[Path]) -> list[Path]:
        """The run's checkpoints (newest first) that hold their optimizer state: a finished run's final weights
        alone (checkpoint.final_model_only) are passed over, in one line, or refused where nothing else is left."""
        full = [p for p in own if holds_optimizer(p)]
        if own and own[0] not in full:
            if not full:
                raise weights_alone(own[0], "the run")
            if self.env.is_main:
                log.info("%s holds the weights alone (checkpoint.final_model_only): resuming from %s, the newest "
                         "checkpoint that holds its optimizer state", own[0].name, full[0].name)
        return full

    def readable_everywhere(self, path: Path, newest: bool) -> str | None:
        """None when every rank can read `path`; else which ranks cannot, and why (every rank takes part). Rank 0
        alone checks every file meta.json lists (a stat each: on every rank, W ranks times the files); the others
        that they see the folder whole. One all-reduce gives the verdict; the ranks' words are gathered on a failure."""
        mine = self.faults.unreadable(newest) or (verify(path) if self.env.is_main else seen_whole(path))
        if all_ranks_ok(mine is None):
            return None
        problems = [f"rank {r} on {host}: {p}" for r, (host, p) in enumerate(gather_objects((self.env.hostname, mine)))
                    if p is not None]
        return "; ".join(problems)

    def load_everywhere(self, path: Path) -> str | None:
        """Load `path` on every rank; None when every rank did."""
        try:
            self.checkpointer.load(path, self.strategy, accept=lambda meta: self.check_resumable(path, meta),
                                   verified=True)
            problem = None
        except Unloadable as e:
            problem = f"loading failed: {e.why}"
        if not all_ranks_ok(problem is None):
            return problem or "another rank could not load its part"
        return None

    def check_resumable(self, path: Path, meta: dict[str, Any]) -> None:
        """This run's own checkpoint must match all of its settings; another run's, used to initialise this
        one (resume=PATH), only its model (the schedule may differ: fine-tuning, a longer run)."""
        saved, current = meta.get("fingerprint"), self.state.fingerprint()
        own = self.checkpointer.root.resolve() in path.resolve().parents
        if own:  # another run's checkpoint may start this one on other data (fine-tuning)
            self.state.check_same_data(path, meta)
        if not own and saved is not None:
            saved = {k: v for k, v in saved.items() if k.startswith("model.")}
            current = {k: v for k, v in current.items() if k.startswith("model.")}
        if own and saved is not None:  # a wsd run extends from its stable phase
            saved = settle(saved, current, int(meta["step"]))
        check_fingerprint(path, saved, current)
        check_loadable(path, meta, self.strategy.cfg, self.env.world_size)

    def restore(self, path: Path) -> Resumed:
        meta = read_meta(path)
        step = self.state.restore(path, meta, self.checkpointer.rank_state(path))
        return Resumed(path, step, bool(meta.get("eval_pending", False)), meta)
