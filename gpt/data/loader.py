"""Deterministic, reshardable batches from prepared token shards.

Every optimizer step has one global batch of `global_batch_size` samples whose start offsets depend only on
(seed, step): `global_batch_offsets`. Sample i of step s has the global index s * global_batch_size + i. Rank r of
D data-parallel ranks takes samples [r*B/D, (r+1)*B/D) of it, and micro-step m the m-th micro_batch_size slice of
that share. Because nothing depends on the world size, a run resumed on another number of ranks (same global batch
size) continues with exactly the samples it would have seen: none replayed, none skipped. A mixture (data.sources)
draws each sample's source by weight from the same (seed, step) generator first.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpt.data import SPLITS, identities, read_meta
from gpt.errors import UserError


# Shards mapped at once, at most. Each np.memmap is one of the process's vm.max_map_count maps (65530 by default)
# and, on Python before 3.13, one open file (mmap keeps a duplicate descriptor; `ulimit -n` is often 1024): a
# corpus of 627 B tokens is about 150,000 shards of 16 MB parts, so they are mapped when read, least recently
# used unmapped first.
MAX_OPEN_SHARDS = 256


@dataclass(frozen=True)
class ShardFile:
    path: Path
    dtype: np.dtype
    offset: int
    tokens: int

    def map(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.tokens,))


class TokenDataset:
    """The shards of one split (of every source of a mixture, source after source), memory-mapped as they are read
    (at most MAX_OPEN_SHARDS at once). Offsets are global: positions in the shards laid end to end. Shards read in place
    (nanoGPT's, llm.c's) are mapped from where they lie, past their header."""

    def __init__(self, directory: str | Path, split: str):
        if split not in SPLITS:
            raise UserError(f"split {split!r} does not exist; the splits are {', '.join(SPLITS)}")
        self.directory = Path(directory)
        self.split = split
        meta = read_meta(directory)
        self.vocab_size: int = meta["vocab_size"]
        self.fingerprint: str | None = meta.get("fingerprint")  # the data's identity, which checkpoints record
        self.identities = identities(meta)  # what a checkpoint of this data may record (gpt.data.identities)
        sources = meta.get("sources") or [{"dir": str(self.directory), "weight": 1.0}]
        self.weights = np.array([s["weight"] for s in sources]) if "sources" in meta else None
        self.shards: list[ShardFile] = []
        self.mapped: OrderedDict[int, np.memmap] = OrderedDict()
        self.lock = threading.Lock()  # the prefetch thread and the training thread (validation) both read
        groups = []
        for i, source in enumerate(sources):
            source_meta = read_meta(source["dir"]) if "sources" in meta else meta
            dtype = np.dtype(source_meta["dtype"]).newbyteorder("<")
            for s in source_meta["splits"][split]["shards"]:
                self.shards.append(ShardFile(Path(source["dir"]) / s["file"], dtype, s.get("offset", 0), s["tokens"]))
                groups.append(i)
        self.groups = np.array(groups, dtype=np.int64)
        self.shard_sizes = np.array([s.tokens for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64)

    def sample_offsets(self, seed: int, step: int, count: int, block_size: int) -> np.ndarray:
        """global_batch_offsets over this split's shards (and sources)."""
        return global_batch_offsets(seed, step, count, self.shard_sizes, block_size, self.weights, self.groups)

    @property
    def num_tokens(self) -> int:
        return int(self.shard_sizes.sum())

    def window(self, offset: int, length: int) -> np.ndarray:
        """Tokens [offset, offset + length) as int64; the window must lie inside one shard."""
        shard = int(np.searchsorted(self.shard_starts, offset, side="right")) - 1
        local = int(offset - self.shard_starts[shard])
        if offset < 0 or local + length > self.shard_sizes[shard]:
            raise IndexError(f"window [{offset}, {offset + length}) crosses a shard boundary or the end of "
                             f"the {self.split} split")
        with self.lock:
            return self._mapped(shard)[local:local + length].astype(np.int64)

    def _mapped(self, shard: int) -> np.memmap:
        if shard in self.mapped:
            self.mapped.move_to_end(shard)
        else:
            if len(self.mapped) >= MAX_OPEN_SHARDS:
                self.mapped.popitem(last=False)  # its map is released with the last reference
            self.mapped[shard] = self.shards[shard].map()
        return self.mapped[shard]

    def windows(self, offsets: Sequence[int], length: int) -> np.ndarray:
        """Shape (len(offsets), length), int64."""
        return np.stack([self.window(int(o), length) for o in offsets])


def global_batch_offsets(seed: int, step: int, global_batch_size: int, num_tokens: int | Sequence[int],
                         block_size: int, weights: np.ndarray | None = None,
                         groups: np.ndarray | None = None) -> np.ndarray:
    """Start offsets (int64, shape (global_batch_size,)) of every sample of optimizer step `step`.

    `num_tokens` is the split's token count, or its tokens per shard: a sample needs block_size + 1 tokens
    (inputs plus the shifted targets) inside one shard, so starts are drawn uniformly over the valid starts of
    all shards. With `weights` (one per source) and `groups` (each shard's source), each sample's source is drawn
    first, then its start uniformly over that source's valid starts. Depends on (seed, step) only, never on the
    world size.
    """
    if step < 0 or seed < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    sizes = np.atleast_1d(np.asarray(num_tokens, dtype=np.int64))
    valid = np.maximum(sizes - block_size, 0)  # start s is valid when s + block_size + 1 <= size
    if valid.sum() == 0:
        raise UserError(f"block_size={block_size} is too long for this data: a sample needs block_size + 1 "
                        f"tokens in one shard and the largest shard has {int(sizes.max(initial=0))}; "
                        f"lower model.block_size or use more text")
    rng = np.random.default_rng([seed, step])
    if weights is None:
        draws = rng.integers(0, valid.sum(), size=global_batch_size, dtype=np.int64)
    else:
        source = rng.choice(len(weights), size=global_batch_size, p=weights)
        within = rng.random(global_batch_size)
        per_source = np.bincount(groups, weights=valid, minlength=len(weights)).astype(np.int64)
        if (per_source[weights > 0] == 0).any():
            raise UserError(f"block_size={block_size} is too long for a source of data.sources: no shard of it "
                            f"holds block_size + 1 tokens")
        source_start = np.cumsum(per_source) - per_source  # sources' shards lie source after source
        draws = source_start[source] + (within * per_source[source]).astype(np.int64)
    valid_end = np.cumsum(valid)
    shard = np.searchsorted(valid_end, draws, side="right")
    shard_starts = np.cumsum(sizes) - sizes
    return shard_starts[shard] + draws - (valid_end[shard] - valid[shard])


def _split_xy(rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def _rank_share(batch_size: int, dp_rank: int, dp_size: int, what: str) -> int:
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
    if batch_size <= 0 or batch_size % dp_size:
        raise UserError(f"{what}={batch_size} must be a positive multiple of the data-parallel size {dp_size}")
    return batch_size // dp_size


class TrainBatches:
    """Micro-batches (x, y) of the training split for one data-parallel rank; see the module docstring."""

    def __init__(self, dataset: TokenDataset, seed: int, block_size: int, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, device: str | torch.device = "cpu"):
        per_rank = _rank_share(global_batch_size, dp_rank, dp_size, "global batch size")
        if micro_batch_size <= 0 or per_rank % micro_batch_size:
            raise UserError(f"micro batch size {micro_batch_size} must divide the per-rank batch "
                            f"{per_rank} (global batch size {global_batch_size} / {dp_size} data-parallel ranks)")
        self.dataset, self.seed, self.block_size = dataset, seed, block_size
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, torch.device(device)
        self.grad_accum_steps = per_rank // micro_batch_size
        self.step = 0  # the first step whose batch has not been handed out in full
        # batches passed over so far (divergence.policy=rollback): step s trains on the batch of index s + skipped
        self.skipped = 0
        self._cached: tuple[int, np.ndarray] | None = None

    def index(self, step: int) -> int:
        """Which batch step `step` trains on: its own, past the batches a rollback passed over."""
        return step + self.skipped

    def skip_to(self, step: int, index: int) -> None:
        """Step `step` (the one a rollback restored) trains on batch `index`: the batches before it are passed
        over, here and in every checkpoint saved from now on."""
        self.skipped = index - step

    def offsets(self, step: int) -> np.ndarray:
        """This rank's share of the step's global batch: start offsets of samples [r*B/D, (r+1)*B/D)."""
        index = self.index(step)
        cached = self._cached  # one read: the prefetching thread may replace it meanwhile
        if cached is None or cached[0] != index:
            offs = self.dataset.sample_offsets(self.seed, index, self.global_batch_size, self.block_size)
            per_rank = self.global_batch_size // self.dp_size
            cached = self._cached = index, offs[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        return cached[1]

    def read(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 (x, y) of shape (micro_batch_size, block_size); y is x shifted left by one token. Moves no
        position: a prefetching thread may call it."""
        if not 0 <= micro_step < self.grad_accum_steps:
            raise ValueError(f"micro_step={micro_step} is outside [0, {self.grad_accum_steps})")
        lo = micro_step * self.micro_batch_size
        rows = self.dataset.windows(self.offsets(step)[lo:lo + self.micro_batch_size], self.block_size + 1)
        return _split_xy(rows, self.device)

    def get(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """read(), and after the step's last micro-batch the position moves past `step`."""
        batch = self.read(step, micro_step)
        if micro_step == self.grad_accum_steps - 1:
            self.step = step + 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "global_batch_size": self.global_batch_size,
                "samples_seen": self.step * self.global_batch_size, "skipped_batches": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where a checkpoint stopped, on any data-parallel size, if the global batch is unchanged."""
        if state["global_batch_size"] != self.global_batch_size:
            raise UserError(
                f"the checkpoint was trained with a global batch size of {state['global_batch_size']} "
                f"({state['samples_seen']} samples seen) but this run uses {self.global_batch_size}; to resume, "
                f"keep the global batch size at {state['global_batch_size']} (choose the micro batch size and "
                f"gradient accumulation so micro x accumulation x data-parallel ranks equals it), "
                f"or start a new run in a new directory")
        if state["seed"] != self.seed:
            raise UserError(f"the checkpoint's data order uses seed {state['seed']} but this run uses seed "
                            f"{self.seed}; resume with seed={state['seed']} or start a new run in a new directory")
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped_batches", 0))  # older checkpoints: none


class Prefetcher:
    """Hands out a step's micro-batches while a background thread reads the next step's. The batches are a function
    of the step alone, so prefetching changes none of them, and a resumed run reads the same ones. `read_s` is what
    reading the step last taken cost (on whichever thread read it): the loader's own cost per step."""

    def __init__(self, batches: TrainBatches):
        self.batches = batches
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.ahead: tuple[int, Future] | None = None
        self.read_s = 0.0

    def _read_step(self, step: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
        start = time.perf_counter()
        micro = [self.batches.read(step, m) for m in range(self.batches.grad_accum_steps)]
        return micro, time.perf_counter() - start

    def take(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every micro-batch of `step` (read ahead when `step` follows the last one taken), and moves the position
        past it."""
        ahead, self.ahead = self.ahead, None
        index = self.batches.index(step)  # a rollback may have moved the batches past the one read ahead
        micro, self.read_s = ahead[1].result() if ahead is not None and ahead[0] == index else self._read_step(step)
        self.batches.step = step + 1
        self.ahead = index + 1, self.pool.submit(self._read_step, step + 1)
        return micro

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class ValBatches:
    """A fixed set of validation batches, identical on every run of the same seed, block size and batch size, whatever
    its micro-batch size and world size.

    Batch j holds the samples of `global_batch_offsets(seed, j, batch_size, ...)` on the validation split (a run's
    batch_size is its global batch size); rank r of dp_size takes its contiguous share of every batch and yields it
    in slices of `micro_batch_size` (default: the whole share), as the run's forward passes are sized. All slices on
    all ranks are equal, so the mean of the per-rank means of the slices' mean losses is the loss of the whole set.
    """

    def __init__(self, dataset: TokenDataset, seed: int, block_size: int, batch_size: int, num_batches: int,
                 dp_rank: int = 0, dp_size: int = 1, device: str | torch.device = "cpu",
                 micro_batch_size: int | None = None):
        per_rank = _rank_share(batch_size, dp_rank, dp_size, "validation batch size")
        micro = micro_batch_size or per_rank
        if micro <= 0 or per_rank % micro:
            raise UserError(f"micro batch size {micro} must divide the per-rank validation batch {per_rank} "
                            f"(batch size {batch_size} / {dp_size} data-parallel ranks)")
        self.dataset, self.block_size, self.device = dataset, block_size, torch.device(device)
        shares = [dataset.sample_offsets(seed, j, batch_size, block_size)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
                  for j in range(num_batches)]
        self._offsets = [share[lo:lo + micro] for share in shares for lo in range(0, per_rank, micro)]

    def __len__(self) -> int:
        """Forward passes per evaluation on this rank."""
        return len(self._offsets)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for offsets in self._offsets:
            yield _split_xy(self.dataset.windows(offsets, self.block_size + 1), self.device)
