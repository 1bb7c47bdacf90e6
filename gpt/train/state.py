"""What a checkpoint of this run holds besides the model and optimizer: meta.json's fields (with the fingerprint of
the settings that must match to continue exactly, and the data's own fingerprint) and each rank's own state (RNG
streams, data position, grad scaler); and putting them back."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from gpt.config.model import ModelConfig
from gpt.config.train import TrainConfig
from gpt.data.loader import TrainBatches
from gpt.train import rng
from gpt.collectives.process_group import DistEnv
from gpt.errors import UserError
from gpt.parallel.base import Strategy
from gpt.parallel.traits import strategy_keys
from gpt.train import schedule

log = logging.getLogger(__name__)


class TrainState:
    def __init__(self, seed: int, data_dir: str, env: DistEnv, model_cfg: ModelConfig, train: TrainConfig,
                 strategy: Strategy, batches: TrainBatches):
        self.seed, self.data_dir, self.env, self.model_cfg, self.train = seed, data_dir, env, model_cfg, train
        self.strategy, self.batches = strategy, batches

    def fingerprint(self) -> dict[str, Any]:
        """What must be equal for a checkpoint to continue this run exactly (max_steps may grow where the steps
        taken do not depend on it: gpt.train.schedule)."""
        t = self.train
        fp: dict[str, Any] = {f"model.{k}": v for k, v in dataclasses.asdict(self.model_cfg).items()}
        fp.update({"seed": self.seed, "train.global_batch_size": t.global_batch_size, "train.lr": t.lr,
                   "train.min_lr": t.min_lr, "train.warmup_steps": t.warmup_steps,
                   **schedule.identity(t), "train.weight_decay": t.weight_decay,
                   "train.betas": list(t.betas), "train.grad_clip": t.grad_clip, **t.numerics()})
        return fp

    @property
    def data_fingerprint(self) -> str | None:
        return self.batches.dataset.fingerprint

    def check_same_data(self, path: Path, meta: dict[str, Any]) -> None:
        """Refuse a checkpoint of this run trained on other data than the folder holds now (one written before
        checkpoints recorded their data is taken as it is)."""
        saved, current = meta.get("data_fingerprint"), self.data_fingerprint
        if saved is not None and current is not None and saved not in self.batches.dataset.identities:
            raise UserError(f"checkpoint {path} was trained on data with fingerprint {saved} (in "
                            f"{meta.get('data_dir')}), but {self.data_dir} now holds data with fingerprint {current}: "
                            f"continue on the data it was trained on, or start a new run under another name (run=NAME)")

    def meta(self, step: int, eval_pending: bool) -> dict[str, Any]:
        return {
            "tokens_seen": step * self.train.global_batch_size * self.model_cfg.block_size,
            "model": dataclasses.asdict(self.model_cfg),
            "data_dir": str(self.data_dir),
            "data_fingerprint": self.data_fingerprint,
            "data": {**self.batches.state_dict(), "step": step,
                     "samples_seen": step * self.train.global_batch_size},
            "world_size": self.env.world_size,
            "dp_size": self.strategy.dp_size,
            "strategy": self.strategy.name,
            "checkpoint_format": self.strategy.traits().checkpoint_format,
            "strategy_keys": strategy_keys(self.strategy.cfg),
            "layout": self.strategy.dims.sizes(),
            "fingerprint": self.fingerprint(),
            "eval_pending": eval_pending,
            "eval_batches": self.train.eval_batches,  # with data's seed and global batch: the validation set
            "time": time.time(),
        }

    def rank_state(self, step: int) -> dict[str, Any]:
        """This rank's own part of a checkpoint: its RNG streams, data position and grad scaler."""
        scaler = self.strategy.scaler
        return {"rank": self.env.rank, "world_size": self.env.world_size, "step": step,
                "rng": rng.capture(self.strategy.device), "data": self.batches.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}

    def restore(self, path: Path, meta: dict[str, Any], state: dict[str, Any] | None) -> int:
        """Put back the data position, RNG streams and grad scaler of `path`; returns its step."""
        step = int(meta["step"])
        self.batches.load_state_dict(meta.get("data") or {**self.batches.state_dict(), "step": step})
        if state is not None and meta.get("world_size") == self.env.world_size:
            rng.restore(state["rng"], self.strategy.device)
            how = "RNG restored"
        else:  # another world size: a fresh, reproducible stream per tp group
            rng.reseed(self.seed, step, rng.stream_index(self.env.rank, self.strategy.dims.tp),
                       self.strategy.device)
            how = f"RNG reseeded (written on {meta.get('world_size')} ranks, now {self.env.world_size})"
        if self.strategy.scaler is not None and state is not None and state.get("scaler"):
            self.strategy.scaler.load_state_dict(state["scaler"])
        if self.env.is_main:
            log.info("resumed from %s at step %d (%s samples seen; %s)", path, step,
                     f"{step * self.train.global_batch_size:,}", how)
        return step
