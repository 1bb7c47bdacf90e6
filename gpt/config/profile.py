"""The profile section: torch.profiler traces of chosen steps on chosen ranks, and CUDA's allocator history (a memory
snapshot on out-of-memory). Off by default, and then nothing is set up. Torch-free: checked on the login node."""
from __future__ import annotations

import re
from dataclasses import dataclass

from gpt.errors import ConfigError

STEPS = re.compile(r"^(\d+)(?:-(\d+))?$")
ALL_RANKS_UP_TO = 8  # profile.ranks=auto: every rank of a run this small; rank 0 and one per node above it


@dataclass(frozen=True)
class ProfileConfig:
    steps: str = ""  # A-B (or A): trace steps A to B, counted from 0, of every attempt that runs them; "": no trace
    ranks: str = "auto"  # auto, all, or ranks like 0,3,8: which ranks trace (auto: all up to 8, else one per node)
    record_shapes: bool = False  # each op's input shapes in the trace
    profile_memory: bool = False  # each op's allocations and frees in the trace
    # on GPUs: keep CUDA's allocator history; write a snapshot on out-of-memory and after the traced steps
    memory_snapshot: bool = False

    def validate(self) -> None:
        self.step_range()
        self.rank_list()

    def step_range(self) -> tuple[int, int] | None:
        """(first, last) step traced, inclusive; None when profile.steps is empty."""
        text = str(self.steps).strip()
        if not text:
            return None
        match = STEPS.match(text)
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ConfigError("profile.steps", self.steps, "A-B with 0 <= A <= B (steps counted from 0, e.g. 10-11), "
                              "a single step A, or empty for no trace")
        return int(match[1]), int(match[2] if match[2] is not None else match[1])

    def rank_list(self) -> tuple[int, ...] | None:
        """The ranks named by profile.ranks; None for auto and all (decided by the world size)."""
        text = str(self.ranks).strip()
        if text in ("auto", "all"):
            return None
        parts = [p.strip() for p in text.split(",")]
        if not parts or not all(p.isdigit() for p in parts):
            raise ConfigError("profile.ranks", self.ranks, "auto, all, or rank numbers separated by commas (e.g. 0,8)")
        return tuple(sorted({int(p) for p in parts}))

    def traces(self, rank: int, local_rank: int, world_size: int) -> bool:
        """Whether this rank records traces."""
        if self.step_range() is None:
            return False
        named = self.rank_list()
        if named is not None:
            return rank in named
        return self.ranks == "all" or world_size <= ALL_RANKS_UP_TO or local_rank == 0
