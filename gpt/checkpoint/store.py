"""Checkpoints on disk: the format, listed and read without torch (the launcher on a login node reads them too).

A checkpoint folder `step_<N>/` holds
  - the strategy's state (DCP shards `__*.distcp` + `.metadata`; DeepSpeed adds its engine folder),
  - `ranks/rank<R>.pt`: each rank's own small state (RNG streams of python, numpy, torch and CUDA, the data
    position, the GradScaler),
  - `meta.json`, written last: step, tokens seen, the config fingerprint, world size, strategy, its place in the
    write order (`save_index`), what the save cost (`save_s`, `save_bytes_per_rank_per_s`), and a manifest of every
    file with its size (a missing or truncated shard is found before anything is loaded).
It is written as `.tmp-step_<N>/` and renamed once every rank's part is on disk (gpt.checkpoint.writer): a crash
mid-save leaves the previous checkpoint loadable; the partial folder is never loaded and is removed by the next save.

Checkpoints are ordered by when they were written, not by step: a run that resumed from an older checkpoint
(its newest was unreadable) writes steps below the ones it abandoned, and those abandoned ones are older. The
newest `keep` by write order are kept (one resume found unusable counts for nothing, and goes once a newer one
is complete), and resume=auto takes the newest by write order. A checkpoint saved after the
run diverged (divergence.policy=skip) says at which step in meta.json (`after_divergence`); the newest one from before
that is kept whatever `keep` says. A folder there whose name is not one of these (a copy a user set aside:
`step_N.bak`, `step_N-copy`) is not the run's: it is never listed, loaded or pruned.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from gpt.errors import UserError
from gpt.run_folder import RunFolder

PREFIX, TMP_PREFIX, OLD_PREFIX, META, RANKS = "step_", ".tmp-step_", ".old-step_", "meta.json", "ranks"
SAVE_RATE = "save_bytes_per_rank_per_s"  # meta.json: the rate each rank wrote this checkpoint at (save_cost)
MODEL_ONLY = "model_only"  # meta.json: the weights alone, in this dtype (checkpoint.final_model_only), no optimizer
AFTER_DIVERGENCE = "after_divergence"  # meta.json: the step of the run's first divergence, in checkpoints saved after

log = logging.getLogger(__name__)
_told: set[Path] = set()  # folders not named as ours, each told once per process (checkpoints are listed often)


def is_whole(path: Path) -> bool:
    """A checkpoint folder is whole once its meta.json exists: it is written last, after every shard."""
    return (path / META).is_file() and (path / ".metadata").is_file()


def seen_whole(path: Path) -> str | None:
    """What this process cannot see of a whole checkpoint folder (its meta.json and .metadata), or None: the cheap
    check of a rank that leaves the manifest's every file to rank 0 (verify)."""
    return None if is_whole(path) else f"{path} is not whole from here (no {META} or .metadata)"


def is_complete(path: Path) -> bool:
    return is_whole(path) and not path.name.startswith(".")


def step_of(path: Path) -> int:
    return int(path.name.rsplit(PREFIX, 1)[1])


def named(root: Path, prefix: str) -> list[Path]:
    """The folders of `root` named `prefix<N>`. Another name that starts with `prefix` is a user's (`step_N.bak`, a
    copy set aside): skipped, with one line, never an error."""
    found = []
    for path in root.glob(f"{prefix}*"):
        digits = path.name.removeprefix(prefix)
        if digits.isascii() and digits.isdigit():
            found.append(path)
        elif path not in _told:
            _told.add(path)
            log.warning("%s is not a checkpoint of the run (its name is not %s<step>): left alone, neither loaded "
                        "nor pruned", path, prefix)
    return found


def save_index(path: Path) -> int:
    """The checkpoint's place in its run's write order (-1 for one written before the order was recorded)."""
    try:
        return int(json.loads((path / META).read_text()).get("save_index", -1))
    except (OSError, ValueError, TypeError):
        return -1


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest written first. A step being saved again is listed under its previous copy
    (`.old-step_<N>/`) until the new one has replaced it, so a crash in between loses neither. A checkpoint that
    another process prunes while this one lists is left out, not an error."""
    if not root.is_dir():
        return []
    found = {step_of(p): p for p in named(root, PREFIX) if is_complete(p)}
    for old in named(root, OLD_PREFIX):
        if is_whole(old):
            found.setdefault(step_of(old), old)
    order = {p: write_order(p) for p in found.values()}
    return sorted((p for p, key in order.items() if key is not None), key=order.__getitem__)


def write_order(path: Path) -> tuple[int, float, int] | None:
    """A checkpoint's place in the write order, from one read of its meta.json; None when it vanished (pruned)
    meanwhile."""
    try:
        with open(path / META) as f:
            mtime, text = os.fstat(f.fileno()).st_mtime, f.read()
    except FileNotFoundError:
        return None
    try:
        index = int(json.loads(text).get("save_index", -1))
    except (ValueError, TypeError, AttributeError):
        index = -1
    return index, mtime, step_of(path)


def newest_sound(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose manifest holds (every file there, at its size), and what is wrong with each
    newer one: what resume=auto continues from, and what decides whether a run has finished."""
    broken = []
    for path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path, broken
        broken.append(f"{path.name}: {problem}")
    return None, broken


def before_divergence(checkpoints: list[Path]) -> Path | None:
    """The newest of `checkpoints` (in write order) saved before the run's first divergence, when a later one says
    it was saved after one: retention keeps it."""
    marked = [_diverged_at(p) is not None for p in checkpoints]
    if not any(marked):
        return None
    good = [p for p, m in zip(checkpoints, marked) if not m]
    return good[-1] if good else None


def holds_optimizer(path: Path) -> bool:
    """Whether a checkpoint holds its optimizer state (all but a finished run's final save under
    checkpoint.final_model_only): what training resumes from."""
    try:
        return not json.loads((path / META).read_text()).get(MODEL_ONLY)
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: resume says why when it gets there


def newest_full(checkpoints: list[Path]) -> Path | None:
    """The newest of `checkpoints` (in write order) that holds its optimizer state: retention keeps it."""
    return next((p for p in reversed(checkpoints) if holds_optimizer(p)), None)


def resumable(path: Path) -> Path:
    """What resume=PATH continues from: the checkpoint PATH names, or a run folder's newest that holds its optimizer
    state; a checkpoint of the weights alone is refused, saying how a run starts from them."""
    chosen = resolve(path)
    if holds_optimizer(chosen):
        return chosen
    full = newest_full(list_checkpoints(chosen.parent)) if chosen != Path(path) else None
    if full is not None:
        return full
    raise weights_alone(chosen, f"resume={path}")


def weights_alone(path: Path, what: str) -> UserError:
    """`what` (resume=PATH, or the run itself) has nothing to continue from but `path`, the weights alone."""
    return UserError(f"{what}: {path} holds the weights alone (checkpoint.final_model_only), without the optimizer "
                     f"state a run continues with; to train on from these weights, export them (python -m gpt.export "
                     f"{path} DIR) and start a new run with init=hf:DIR (docs/export.md)")


def _diverged_at(path: Path) -> int | None:
    try:
        return json.loads((path / META).read_text()).get(AFTER_DIVERGENCE)
    except (OSError, ValueError, AttributeError):
        return None


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is unreadable ({path / META}: {e})") from e


def manifest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def save_cost(files: dict[str, int], world_size: int, seconds: float) -> dict[str, float]:
    """meta.json's record of what the save cost: its seconds, and the bytes each rank wrote per second (the whole
    checkpoint over its ranks: DCP spreads replicated state over its holders), which planning's save-time check
    (launch.planning.save_time) reads for the run's next attempt."""
    rate = sum(files.values()) / max(world_size, 1) / max(seconds, 1e-6)
    return {"save_s": round(seconds, 3), SAVE_RATE: round(rate)}


def last_save_rate(root: Path) -> tuple[float, int] | None:
    """(bytes per second per rank, its step) as measured at the newest checkpoint's save; None before one was."""
    for path in reversed(list_checkpoints(root)):
        try:
            rate = json.loads((path / META).read_text()).get(SAVE_RATE)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(rate, (int, float)) and rate > 0:
            return float(rate), step_of(path)
    return None


def verify(path: Path) -> str | None:
    """What is wrong with a checkpoint folder (naming the file), or None when every file is there, whole."""
    if not (path / META).is_file():
        return f"{path / META} is missing (the save did not finish)"
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{path / META} is unreadable: {e}"
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"shard {f} is missing"
        if f.stat().st_size != size:
            return f"shard {f} has {f.stat().st_size} bytes, {size} were written (truncated or corrupt)"
    if not (path / ".metadata").is_file():
        return f"{path / '.metadata'} is missing"
    return None


def check_fingerprint(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse a checkpoint written under a config that trains differently; list every mismatching key."""
    if saved is None:
        return
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: checkpoint {saved.get(k, '<unset>')!r}, this run {current.get(k, '<unset>')!r}"
             for k in keys if _norm(saved.get(k)) != _norm(current.get(k))]
    if diffs:
        raise UserError(f"checkpoint {path} was written by a run with a different config; mismatching keys:\n  "
                        + "\n  ".join(diffs) + "\nresume with the same settings, resume=none to start over in a "
                        "new run folder, or point hydra.run.dir at a new folder")


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value)) if value is not None else None


def resolve(path: Path) -> Path:
    """A checkpoint folder, or the newest complete one in a run folder or its checkpoints/ folder."""
    path = Path(path)
    if is_whole(path):
        return path
    for root in (RunFolder(path).checkpoints, path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise UserError(f"no complete checkpoint in {path} (looked for {PREFIX}*/ with {META})")
