"""The checkpointer: saves sharded through torch.distributed.checkpoint (every rank writes its part), written
atomically (a temporary folder renamed once complete), and pruned to the newest `keep`; and loads them. The format on
disk is gpt.checkpoint.store's. The trainer only says save or load.
"""
from __future__ import annotations

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
from torch.distributed.checkpoint.api import CheckpointException

from gpt.checkpoint.durable import fsync_path, fsync_tree, write_durably
from gpt.checkpoint.engine_weights import engine_weights, needs_engine
from gpt.checkpoint.safe_load import Refused, check_metadata, load_dcp, load_rank_state, warn_if_foreign
from gpt.checkpoint.save_errors import SaveFailed, failure_line, folder_bytes, storage_error
from gpt.checkpoint.staging import ShareStager, make_stager
from gpt.checkpoint.store import (AFTER_DIVERGENCE, META, OLD_PREFIX, PREFIX, RANKS, TMP_PREFIX, before_divergence,
                                  is_complete, is_whole, list_checkpoints, manifest, named, read_meta, resolve,
                                  newest_full, save_cost, save_index, step_of, verify)
from gpt.collectives.process_group import all_true, from_rank0_object, gather_objects
from gpt.errors import UserError, error_line
from gpt.resilience.lease import fence

log = logging.getLogger(__name__)
# A single process (no process group) saves and loads DCP checkpoints on purpose; DCP warns on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class Unloadable(UserError):
    """A checkpoint that looked whole, but whose shards failed to load (`why`: the loader's own words)."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"checkpoint {path} could not be loaded: {why}")
        self.why = why


def all_ranks_ok(ok: bool) -> bool:
    """True on every rank when `ok` is True on every rank (a collective)."""
    return all_true(ok)


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
                 async_group: Any = None, async_save: bool = False, before_commit: Callable[[int], None] | None = None,
                 after_commit: Callable[[int, Path], None] | None = None, threads: int = 1, staging: bool = False):
        self.root, self.keep, self.is_main, self.rank = root, keep, is_main, rank
        self.threads = threads  # files each rank writes at once (DCP's thread_count)
        self.staging = staging  # a synchronous save on a GPU copies through the stager's pinned buffers first
        self.async_save, self.async_group = async_save, async_group
        self.pending: Pending | None = None
        self.before_commit = before_commit  # a test hook (debug.save_sleep_s): runs before meta.json is written
        self.after_commit = after_commit  # rank 0's, once a checkpoint is in place and every rank knows it
        self.last_blocked_s = 0.0  # how long the last save() held up training
        self.stager: ShareStager | None = None  # created at the first asynchronous save, reused by the next
        self.staging_wait_s = 0.0  # in all: training waiting for staging copies, after save() returned
        self.diverged_at: int | None = None  # the run's first divergence: later saves are marked with it
        self.unusable: set[Path] = set()  # what resume skipped as unusable: retention does not count them

    def diverged(self, step: int) -> None:
        """The run diverged at `step` (gpt.train.divergence): saves from now on say so, and retention keeps the newest
        checkpoint from before."""
        if self.diverged_at is None:
            self.diverged_at = step

    # --- saving -----------------------------------------------------------------------------------------
    def save(self, step: int, strategy, meta: dict[str, Any], rank_state: dict[str, Any] | None = None,
             allow_async: bool = True, weights_dtype: Any = None, last: bool = False) -> Path:
        """Every rank calls it at the same step. Returns the final folder (complete once the save is done). A
        write that storage refuses on any rank raises SaveFailed on every rank, once the partial folder is gone.
        `weights_dtype`: the model alone, in that dtype (synchronously; the caller marks it in `meta`). `last`: the
        run's last weights (DeepSpeed then adds them whole, beside its engine's partitions)."""
        start = time.perf_counter()
        self.wait()  # the previous asynchronous save first
        if self.diverged_at is not None:
            meta = {**meta, AFTER_DIVERGENCE: self.diverged_at}
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f"{TMP_PREFIX}{step:08d}"
        self._agreed(tmp, lambda: self._make_folder(tmp) if self.is_main else None)
        self._agreed(tmp, lambda: self._write_rank_state(tmp, rank_state))
        dcp_strategy = getattr(strategy, "supports_async_save", False)  # DeepSpeed's engine writes its own
        if allow_async and self.async_save and dcp_strategy:
            response = self._agreed(tmp, lambda: strategy.save_state(tmp, async_group=self.async_group,
                                                                     stager=self._stager(strategy),
                                                                     threads=self.threads))
            self.pending = Pending(response.upload_completion, response.staging_completion, step, tmp, final,
                                   meta, time.perf_counter())
            self.last_blocked_s = time.perf_counter() - start
            return final
        if weights_dtype is not None:
            self._agreed(tmp, lambda: strategy.save_weights(tmp, weights_dtype, self.threads))
        elif dcp_strategy:  # a CPU run's state is in host memory already: nothing to stage
            stager = self._stager(strategy) if self.staging and strategy.device.type == "cuda" else None
            self._agreed(tmp, lambda: strategy.save_state(tmp, stager=stager, threads=self.threads))
        else:
            self._agreed(tmp, lambda: strategy.save_state(tmp, last=last))
        synced = weights_dtype is not None or getattr(strategy, "syncs_own_files", False)
        self._commit(step, tmp, final, meta, start, synced)
        self.last_blocked_s = time.perf_counter() - start
        return final

    def _stager(self, strategy) -> ShareStager:
        """The stager, made at the first save that stages and kept with its buffers: the asynchronous saves' and the
        synchronous ones' alike (they agree on writers over the background saves' group, or the default one)."""
        if self.stager is None:
            group = None if self.async_group == "local" else self.async_group
            self.stager = make_stager(strategy.device, group)
        return self.stager

    def _make_folder(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    def _write_rank_state(self, tmp: Path, rank_state: dict[str, Any] | None) -> None:
        """This rank's file, flushed by the rank that wrote it: on a shared file system another node's fsync (rank
        0's, at the commit) does not flush what this node still caches, as DCP's writers sync their own shards."""
        if rank_state is None:
            return
        (tmp / RANKS).mkdir(exist_ok=True)
        with open(tmp / RANKS / f"rank{self.rank}.pt", "wb") as f:
            torch.save(rank_state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp / RANKS)

    def _agreed(self, tmp: Path, write: Callable[[], Any]) -> Any:
        """Run one part of a save on every rank. When storage refused it anywhere (DCP already gathers its
        writers' errors), the partial save is removed and every rank raises the same SaveFailed."""
        error = None
        try:
            result = write()
        except UserError:
            raise
        except (Exception, CheckpointException) as e:  # DCP's gathered exception is a BaseException
            error = storage_error(e, self.root)
            if error is None:
                raise
            result = None
        if not all_ranks_ok(error is None):
            self._abandon(tmp, error)
        return result

    def _abandon(self, tmp: Path, error: OSError | None) -> None:
        """Remove the partial save `tmp` and raise, on every rank, the line that says why it failed."""
        errors = [OSError(*e) for e in gather_objects(_plain(error)) if e is not None]
        line = None
        if self.is_main:
            written = folder_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            found = list_checkpoints(self.root)
            line = failure_line(tmp, errors[0] if errors else None, written, found[-1] if found else None, self.keep)
        raise SaveFailed(from_rank0_object(line))

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
        self._agreed(p.tmp, p.future.result)  # the write's error, if any, on every rank
        self._commit(p.step, p.tmp, p.final, p.meta, p.started, synced=True)  # DCP's writer synced its files
        log.info("saved checkpoint %s (written in the background in %.2f s; this rank staged %.1f MiB and training "
                 "waited %.2f s for it)", p.final, time.perf_counter() - p.started, self.stager.staged_bytes / 2**20,
                 p.staging_wait_s)
        return p.final

    def wait(self) -> Path | None:
        """Block until the pending asynchronous save is written on every rank, then commit it."""
        if self.pending is None:
            return None
        return self.finish_async()

    def _commit(self, step: int, tmp: Path, final: Path, meta: dict[str, Any], started: float, synced: bool) -> None:
        """Rank 0 makes every file durable (`synced`: their writers did, on their own nodes, as only they can on a
        shared file system; it syncs the folders alone), writes meta.json (with the manifest) and renames the folder
        into place, then prunes; every rank learns whether the checkpoint is in."""
        error: BaseException | None = None
        if self.is_main:
            try:
                self._put_in_place(step, tmp, final, meta, started, synced)
                self._prune()
            except Exception as e:  # reported below, after the ranks agree
                error = e
        if all_ranks_ok(error is None):
            if self.is_main and self.after_commit is not None:
                self.after_commit(step, final)
            return
        if error is None:
            raise SaveFailed(f"checkpoint {tmp} was not committed: rank 0 failed to (its log says why)")
        if storage_error(error, self.root) is None:
            raise error
        self._abandon(tmp, storage_error(error, self.root))

    def _put_in_place(self, step: int, tmp: Path, final: Path, meta: dict[str, Any], started: float,
                      synced: bool) -> None:
        slept = time.perf_counter()
        if self.before_commit is not None:
            self.before_commit(step)
        slept = time.perf_counter() - slept  # a test's sleep is no part of what the save cost
        fsync_tree(tmp, files=not synced)  # every rank's files and their folders, before meta.json says they are whole
        files = manifest(tmp)
        cost = save_cost(files, meta.get("world_size", 1), time.perf_counter() - started - slept)
        index = max((save_index(p) for p in list_checkpoints(self.root)), default=-1) + 1
        write_durably(tmp / META, json.dumps({"step": step, **meta, **cost, "save_index": index, "files": files},
                                             indent=1))
        fsync_path(tmp)
        fence()  # a writer whose attempt lost the run folder commits nothing into it
        replace_folder(self.root, tmp, final)
        fsync_path(self.root)  # the rename is on disk before anything older is pruned

    def _prune(self) -> None:
        """Keep the newest `keep` usable ones by write order, the newest from before a divergence, and the newest that
        holds its optimizer state. The checkpoint
        this run resumed from is among them until a newer one is complete, and the one just written is always kept;
        one that resume found unusable counts for nothing, and goes once a newer one is complete."""
        fence()
        found = list_checkpoints(self.root)
        kept = {*[p for p in found if p not in self.unusable][-self.keep:], before_divergence(found), found[-1],
                newest_full(found)}  # a run continued past a final save of the weights alone resumes from it
        for old in found:
            if old not in kept:
                if old in self.unusable:
                    log.info("removing %s, which resume found unusable", old)
                shutil.rmtree(old, ignore_errors=True)
        for partial in named(self.root, TMP_PREFIX):  # left by a crash during an earlier save
            if self.pending is None or partial != self.pending.tmp:
                log.info("removing %s, left incomplete by an earlier attempt", partial)
                shutil.rmtree(partial, ignore_errors=True)
        for old in named(self.root, OLD_PREFIX):  # a re-save that crashed after its new copy was in
            if is_complete(self.root / old.name.replace(OLD_PREFIX, PREFIX)):
                shutil.rmtree(old, ignore_errors=True)

    # --- loading ----------------------------------------------------------------------------------------
    def load(self, path: Path, strategy, accept: Callable[[dict[str, Any]], None] | None = None,
             verified: bool = False) -> dict[str, Any]:
        """Load into the strategy's model and optimizer, whatever world size wrote them. `accept(meta)` raises a
        UserError before anything is loaded when the checkpoint must not go into this run; shards that fail to
        load raise Unloadable. `verified`: the caller has checked the manifest already (resume, on rank 0)."""
        if not is_whole(path):
            raise UserError(f"{path} is not a complete checkpoint (no {META} or .metadata)")
        problem = None if verified else verify(path)
        if problem:
            raise UserError(f"checkpoint {path} is unusable: {problem}")
        meta = read_meta(path)
        if accept is not None:
            accept(meta)
        self.diverged_at = meta.get(AFTER_DIVERGENCE)  # a run resumed after a divergence goes on marking
        check_metadata(path)
        try:
            strategy.load_state(path)
        except UserError:
            raise
        except (Exception, CheckpointException) as e:  # a corrupt shard: DCP's exception ends with every rank's error
            raise Unloadable(path, error_line(e, from_end=True, prefer_error=True, limit=400)) from e
        return meta

    def rank_state(self, path: Path) -> dict[str, Any] | None:
        f = path / RANKS / f"rank{self.rank}.pt"
        if not f.is_file():
            return None
        try:
            return load_rank_state(f)
        except Refused as e:
            raise Refused(f"checkpoint {path}: {e}") from None
        except Exception as e:
            raise UserError(f"checkpoint {path}: {f} is unreadable "
                            f"({error_line(e, from_end=True, prefer_error=True, limit=400)})") from e


def replace_folder(root: Path, tmp: Path, final: Path) -> None:
    """Put the new copy in place; an existing copy of the step moves aside first and goes only once the new one is
    in (a crash in between leaves it listed and loadable)."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = root / f"{OLD_PREFIX}{step_of(final):08d}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(root)
    shutil.rmtree(old, ignore_errors=True)


def load_model(path: Path, device: str = "cpu"):
    """Rebuild the trained GPT from a checkpoint alone, for generation and evaluation in one process."""
    from gpt.config.model import ModelConfig
    from gpt.model.transformer import GPT

    path = resolve(path)
    warn_if_foreign(path)
    meta = read_meta(path)
    check_metadata(path)
    model = GPT(ModelConfig(**meta["model"]))
    if needs_engine(path):  # a DeepSpeed checkpoint other than its run's last
        weights = engine_weights(path)
    else:
        state = {"model": model.state_dict()}
        load_dcp(state, path)  # a DCP checkpoint loads into one plain process too
        weights = state["model"]
    model.load_state_dict(weights)
    return model.to(device).eval(), meta, path


def _plain(error: OSError | None) -> list | None:
    """The error as it travels to rank 0 (as JSON): its errno, message and file name."""
    if error is None:
        return None
    return [error.errno, error.strerror, None if error.filename is None else str(error.filename)]
