"""A run is one folder from its first submission to its last step (runs/<run>; a sweep's points under
runs/sweeps/<run>/). Submitting the same command again continues it. Before anything runs, the launcher checks
that the folder's run is this run (RUN_DIR/run.json records what must not change: model, data, optimiser
schedule, seed), that no other live run holds it (launch.run_lock), and whether it has already finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from gpt.checkpoint import list_checkpoints, step_of
from gpt.errors import UserError
from launch.job_env import JobEnvironment
from launch.run_lock import check_free

RECORD = "run.json"
# What must be equal for a run to continue exactly (train.max_steps may grow when train.decay_steps is set).
KEYS = ("seed", "model", "data.text_md5", "data.tokenizer", "data.vocab_size", "data.val_fraction",
        "train.global_batch_size", "train.lr", "train.min_lr", "train.warmup_steps", "train.decay_steps (or max_steps)",
        "train.weight_decay", "train.betas", "train.grad_clip", "train.precision")


def text_md5(path: Path, known: dict[str, Any] | None = None) -> str:
    """The corpus's md5, read again only when its size or modification time changed since `known`."""
    stat = path.stat()
    if known and known.get("size") == stat.st_size and known.get("mtime") == stat.st_mtime:
        return known["md5"]
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def identity(cfg: DictConfig, known_text: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what must not change, flattened; the corpus's size, mtime and md5)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    text = Path(to_absolute_path(c["data"]["text_path"]))
    stat = text.stat()
    corpus = {"size": stat.st_size, "mtime": stat.st_mtime, "md5": text_md5(text, known_text)}
    train = c["train"]
    values = {"seed": c["seed"], "model": c["model"], "data.text_md5": corpus["md5"],
              "train.decay_steps (or max_steps)": train.get("decay_steps") or train.get("max_steps")}
    for key in KEYS:
        section, _, name = key.partition(".")
        if key not in values and name in (c.get(section) or {}):
            values[key] = c[section][name]
    return _flat(values), corpus


@dataclass(frozen=True)
class Existing:
    step: int | None  # the newest complete checkpoint's step
    finished: bool


def newest_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint by write order: the one resume=auto continues from."""
    found = list_checkpoints(run_dir / "checkpoints")
    return step_of(found[-1]) if found else None


def check_run_folder(cfg: DictConfig, run_dir: Path, job: JobEnvironment, job_running=None) -> Existing | None:
    """Before anything runs: None for a new run; else what the folder holds, once it is known to be this run.
    Raises UserError when another run holds the folder, when its run differs (the keys are listed), or when
    resume=none would start over on top of it."""
    record_path = run_dir / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    check_free(run_dir, job.job_id, job_running or job.job_running)
    current, corpus = identity(cfg, (record or {}).get("corpus"))
    step = newest_step(run_dir)
    if step is not None and cfg.get("resume", "auto") == "none":
        raise UserError(f"{run_dir} already holds this run at step {step}: resume=none would start over on top of "
                        f"it. Continue it (resume=auto), or start a new run under another name (run=NAME), or delete "
                        f"the folder")
    if record is not None:
        saved = record["identity"]
        diffs = [f"{k}: the run has {saved.get(k, '<unset>')!r}, this command {current.get(k, '<unset>')!r}"
                 for k in sorted(set(current) | set(saved)) if saved.get(k) != current.get(k)]
        if diffs and step is not None:
            raise UserError(f"{run_dir} holds a run with other settings (step {step}); it cannot continue with these. "
                            "Differing keys:\n  " + "\n  ".join(diffs) + "\nRun it with its own settings, or start a "
                            "new run under another name (run=NAME).")
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_name(f".{RECORD}.{os.getpid()}")  # every task of a job may write it at once
    tmp.write_text(json.dumps({"identity": current, "corpus": corpus,
                               "created": (record or {}).get("created", time.time())}, indent=1))
    os.replace(tmp, record_path)
    if step is None:
        return None
    return Existing(step, step >= int(cfg.train.max_steps))
