"""Checkpoints: sharded through torch.distributed.checkpoint (every rank writes its part), written atomically
(a temporary folder renamed once complete), and pruned to the newest `keep`. The trainer only says save or load.

A checkpoint folder `step_<N>/` holds
  - the strategy's state (DCP shards `__*.distcp` + `.metadata`; DeepSpeed adds its engine folder),
  - `ranks/rank<R>.pt`: each rank's own small state (RNG streams of python, numpy, torch and CUDA, the data
    position, the GradScaler),
  - `meta.json`, written last: step, tokens seen, the config fingerprint, world size, strategy, its place in the
    write order (`save_index`), and a manifest of every file with its size (a missing or truncated shard is found
    before anything is loaded).
It is written as `.tmp-step_<N>/` and renamed once every rank's part is on disk: a crash mid-save leaves the
previous checkpoint loadable; the partial folder is never loaded and is removed by the next save.

Checkpoints are ordered by when they were written, not by step: a run that resumed from an older checkpoint
(its newest was unreadable) writes steps below the ones it abandoned, and those abandoned ones are older. The
newest `keep` by write order are kept, and resume=auto takes the newest by write order.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from gpt.distributed import all_true, barrier
from gpt.errors import UserError

log = logging.getLogger(__name__)
# A single process (no process group) saves and loads DCP checkpoints on purpose; DCP warns on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

PREFIX, TMP_PREFIX, OLD_PREFIX, META, RANKS = "step_", ".tmp-step_", ".old-step_", "meta.json", "ranks"


def all_ranks_ok(ok: bool) -> bool:
    """True on every rank when `ok` is True on every rank (a collective)."""
    return all_true(ok)


def is_whole(path: Path) -> bool:
    """A checkpoint folder is whole once its meta.json exists: it is written last, after every shard."""
    return (path / META).is_file() and (path / ".metadata").is_file()


def is_complete(path: Path) -> bool:
    return is_whole(path) and not path.name.startswith(".")


def step_of(path: Path) -> int:
    return int(path.name.rsplit(PREFIX, 1)[1])


def save_index(path: Path) -> int:
    """The checkpoint's place in its run's write order (-1 for one written before the order was recorded)."""
    try:
        return int(json.loads((path / META).read_text()).get("save_index", -1))
    except (OSError, ValueError, TypeError):
        return -1


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest written first. A step being saved again is listed under its previous copy
    (`.old-step_<N>/`) until the new one has replaced it, so a crash in between loses neither."""
    if not root.is_dir():
        return []
    found = {step_of(p): p for p in root.glob(f"{PREFIX}*") if is_complete(p)}
    for old in root.glob(f"{OLD_PREFIX}*"):
        if is_whole(old):
            found.setdefault(step_of(old), old)
    return sorted(found.values(), key=lambda p: (save_index(p), (p / META).stat().st_mtime, step_of(p)))


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is unreadable ({path / META}: {e})") from e


def manifest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


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


def make_stager() -> DefaultStager:
    """Stages a state dict for an asynchronous save in a background thread, into CPU buffers it keeps and reuses
    from one save to the next (allocating 1.65 GB anew each time cost more than copying it). With CUDA the buffers
    are pinned and the copies non-blocking, on a stream of their own."""
    cuda = torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True,
                                        use_non_blocking_copy=cuda))


@dataclass
class Pending:
    """An asynchronous save in flight: the state is being copied into the staging buffers (`staged`), then its
    shards written to `tmp` (`future`), while training goes on."""

    future: Any
    staged: Any
    step: int
    tmp: Path
    final: Path
    meta: dict[str, Any]
    started: float
    staging_wait_s: float = 0.0  # how long training waited for the staging copy before changing the weights


class Checkpointer:
    def __init__(self, root: Path, keep: int = 3, is_main: bool = True, rank: int = 0,
                 async_group: Any = None, async_save: bool = False, before_commit: Callable[[int], None] | None = None):
        self.root, self.keep, self.is_main, self.rank = root, keep, is_main, rank
        self.async_save, self.async_group = async_save, async_group
        self.pending: Pending | None = None
        self.before_commit = before_commit  # a test hook (debug.save_sleep_s): runs before meta.json is written
        self.last_blocked_s = 0.0  # how long the last save() held up training
        self.stager: DefaultStager | None = None  # created at the first asynchronous save, reused by the next
        self.staging_wait_s = 0.0  # in all: training waiting for staging copies, after save() returned

    # --- saving -----------------------------------------------------------------------------------------
    def save(self, step: int, strategy, meta: dict[str, Any], rank_state: dict[str, Any] | None = None,
             allow_async: bool = True) -> Path:
        """Every rank calls it at the same step. Returns the final folder (complete once the save is done)."""
        start = time.perf_counter()
        self.wait()  # the previous asynchronous save first
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f"{TMP_PREFIX}{step:08d}"
        error = None
        if self.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                error = e
        if not all_ranks_ok(error is None):
            raise UserError(_write_error(tmp if error is None else Path(error.filename or tmp), error,
                                         "rank 0 could not create the checkpoint folder"))
        try:
            if rank_state is not None:
                (tmp / RANKS).mkdir(exist_ok=True)
                torch.save(rank_state, tmp / RANKS / f"rank{self.rank}.pt")
            ok = True
        except OSError as e:
            error, ok = e, False
        if not all_ranks_ok(ok):
            raise UserError(_write_error(tmp / RANKS, error, "another rank could not write its state"))
        use_async = allow_async and self.async_save and getattr(strategy, "supports_async_save", False)
        try:
            if use_async:
                self.stager = self.stager or make_stager()
                response = strategy.save_state(tmp, async_group=self.async_group, stager=self.stager)
                self.pending = Pending(response.upload_completion, response.staging_completion, step, tmp, final,
                                       meta, time.perf_counter())
                self.last_blocked_s = time.perf_counter() - start
                return final
            strategy.save_state(tmp)
        except OSError as e:
            raise UserError(_write_error(tmp, e, "")) from e
        except Exception as e:  # DCP gathers every rank's write errors into one exception
            if "No space left" in str(e) or "Permission denied" in str(e) or "Read-only" in str(e):
                raise UserError(f"cannot write checkpoint {tmp}: {str(e).strip().splitlines()[-1]}") from e
            raise
        barrier()
        self._commit(step, tmp, final, meta)
        barrier()
        self.last_blocked_s = time.perf_counter() - start
        return final

    def wait_staged(self) -> None:
        """Call before the weights or optimizer state change: the staging copy of a pending save must be whole."""
        p = self.pending
        if p is not None and not p.staged.done():
            start = time.perf_counter()
            p.staged.result()
            waited = time.perf_counter() - start
            p.staging_wait_s += waited
            self.staging_wait_s += waited

    def close(self) -> None:
        """Wait for the pending save and free the staging buffers."""
        self.wait()
        if self.stager is not None:
            self.stager.close()
            self.stager = None

    def poll_done(self) -> bool:
        """Whether this rank's part of the asynchronous save is written (True when none is pending)."""
        return self.pending is None or self.pending.future.done()

    def finish_async(self) -> Path | None:
        """Every rank's part is written (the trainer agreed on it in the step's all_reduce): commit it."""
        p, self.pending = self.pending, None
        if p is None:
            return None
        p.future.result()  # raises the write's error, if any
        self._commit(p.step, p.tmp, p.final, p.meta)
        log.info("saved checkpoint %s (written in the background in %.2f s; training waited %.2f s for staging)",
                 p.final, time.perf_counter() - p.started, p.staging_wait_s)
        return p.final

    def wait(self) -> Path | None:
        """Block until the pending asynchronous save is written on every rank, then commit it."""
        if self.pending is None:
            return None
        self.pending.future.result()
        barrier()
        final = self.finish_async()
        barrier()
        return final

    def _commit(self, step: int, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        if not self.is_main:
            return
        if self.before_commit is not None:
            self.before_commit(step)
        try:
            files = manifest(tmp)
            index = max((save_index(p) for p in list_checkpoints(self.root)), default=-1) + 1
            (tmp / META).write_text(json.dumps({"step": step, **meta, "save_index": index, "files": files},
                                               indent=1))
            self._replace(tmp, final)
        except OSError as e:
            raise UserError(_write_error(tmp, e, "")) from e
        self._prune()

    def _replace(self, tmp: Path, final: Path) -> None:
        """Put the new copy in place; an existing copy of the step moves aside first and goes only once the new
        one is in (a crash in between leaves it listed and loadable)."""
        if not final.exists():
            os.replace(tmp, final)
            return
        old = self.root / f"{OLD_PREFIX}{step_of(final):08d}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        """Keep the newest `keep` by write order. The checkpoint this run resumed from is among them until a
        newer one is complete, and the one just written is always kept."""
        for old in list_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in self.root.glob(f"{TMP_PREFIX}*"):  # left by a crash during an earlier save
            if self.pending is None or partial != self.pending.tmp:
                log.info("removing %s, left incomplete by an earlier attempt", partial)
                shutil.rmtree(partial, ignore_errors=True)
        for old in self.root.glob(f"{OLD_PREFIX}*"):  # a re-save that crashed after its new copy was in
            if is_complete(self.root / old.name.replace(OLD_PREFIX, PREFIX)):
                shutil.rmtree(old, ignore_errors=True)

    # --- loading ----------------------------------------------------------------------------------------
    def load(self, path: Path, strategy) -> dict[str, Any]:
        """Load into the strategy's model and optimizer, whatever world size wrote them."""
        if not is_complete(path):
            raise UserError(f"{path} is not a complete checkpoint (no {META} or .metadata)")
        problem = verify(path)
        if problem:
            raise UserError(f"checkpoint {path} is unusable: {problem}")
        meta = read_meta(path)
        try:
            strategy.load_state(path)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"checkpoint {path} could not be loaded: {_first_line(e)}") from e
        return meta

    def rank_state(self, path: Path) -> dict[str, Any] | None:
        f = path / RANKS / f"rank{self.rank}.pt"
        if not f.is_file():
            return None
        try:
            return torch.load(f, weights_only=False)
        except Exception as e:
            raise UserError(f"checkpoint {path}: {f} is unreadable ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    # DCP wraps every rank's failure in a CheckpointException whose last lines say what went wrong.
    interesting = [x for x in lines if "Error" in x or "error" in x]
    return (interesting[-1] if interesting else lines[-1] if lines else type(e).__name__)[:400]


def _write_error(path: Path, e: BaseException | None, fallback: str) -> str:
    if e is None:
        return f"cannot write checkpoint {path}: {fallback}"
    why = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
           errno.EACCES: "permission denied (a read-only folder?)",
           errno.EPERM: "operation not permitted (a read-only or immutable folder?)"}.get(
        getattr(e, "errno", None), getattr(e, "strerror", None) or str(e))
    return (f"cannot write checkpoint {getattr(e, 'filename', None) or path}: {why}; point hydra.run.dir at a "
            "writable folder with room for the checkpoints")


def resolve(path: Path) -> Path:
    """A checkpoint folder, or the newest complete one in a run folder or its checkpoints/ folder."""
    path = Path(path)
    if is_whole(path):
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
