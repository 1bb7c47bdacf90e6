"""Checkpoints: sharded through torch.distributed.checkpoint (every rank writes its part), written atomically
(a temporary folder renamed once complete), and pruned to the newest `keep`. The trainer only says save or load."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from gpt.errors import UserError

log = logging.getLogger(__name__)

PREFIX, TMP_PREFIX, META = "step_", ".tmp-step_", "meta.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_complete(path: Path) -> bool:
    """A checkpoint is complete once its meta.json exists: it is written last, after every shard."""
    return (path / META).is_file() and (path / ".metadata").is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob(f"{PREFIX}*") if is_complete(p)), key=lambda p: int(p.name[len(PREFIX):]))


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is unreadable ({path / META}: {e})") from e


class Checkpointer:
    def __init__(self, root: Path, keep: int = 3, is_main: bool = True):
        self.root, self.keep, self.is_main = root, keep, is_main

    def save(self, step: int, model, optimizer, meta: dict[str, Any]) -> Path:
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f"{TMP_PREFIX}{step:08d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        _barrier()
        if self.is_main:
            (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        for old in list_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in self.root.glob(f"{TMP_PREFIX}*"):  # left by a crash during an earlier save
            shutil.rmtree(partial, ignore_errors=True)

    def latest(self) -> Path | None:
        found = list_checkpoints(self.root)
        return found[-1] if found else None

    @staticmethod
    def load(path: Path, model, optimizer=None) -> dict[str, Any]:
        """Load into a (possibly wrapped or sharded) model and optimizer; DCP reshards as needed."""
        if not is_complete(path):
            raise UserError(f"{path} is not a complete checkpoint (no {META} or .metadata)")
        meta = read_meta(path)
        if optimizer is None:
            state = {"model": model.state_dict()}
            dcp.load(state, checkpoint_id=path)
            model.load_state_dict(state["model"])
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return meta


def resolve(path: Path) -> Path:
    """A checkpoint folder, or the newest complete one in a run folder or its checkpoints/ folder."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise UserError(f"no complete checkpoint in {path} (looked for {PREFIX}*/ with {META})")


def load_model(path: Path, device: str = "cpu"):
    """Rebuild the trained GPT from a checkpoint alone, for generation and evaluation in one process."""
    from gpt.config import ModelConfig
    from gpt.model import GPT

    path = resolve(path)
    meta = read_meta(path)
    model = GPT(ModelConfig(**meta["model"]))
    Checkpointer.load(path, model)
    return model.to(device).eval(), meta, path
