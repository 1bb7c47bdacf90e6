"""Checkpoints: sharded through torch.distributed.checkpoint (every rank writes its part), written atomically
(a temporary folder renamed once complete), and pruned to the newest `keep`. The trainer only says save or load."""
from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from gpt.errors import UserError

log = logging.getLogger(__name__)
# A single process (no process group) saves and loads DCP checkpoints on purpose; DCP warns on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

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

    def save(self, step: int, strategy, meta: dict[str, Any]) -> Path:
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f"{TMP_PREFIX}{step:08d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        strategy.save_state(tmp)
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

    def load(self, path: Path, strategy) -> dict[str, Any]:
        """Load into the strategy's model and optimizer, whatever world size wrote them."""
        if not is_complete(path):
            raise UserError(f"{path} is not a complete checkpoint (no {META} or .metadata)")
        meta = read_meta(path)
        strategy.load_state(path)
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
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=path)  # a DCP checkpoint loads into one plain process too
    model.load_state_dict(state["model"])
    return model.to(device).eval(), meta, path
