"""torch.compile's artifacts kept with the run: a requeued attempt loads the graphs the attempt before compiled instead
of compiling them again. Inductor caches them on disk under TORCHINDUCTOR_CACHE_DIR (its FX graphs, AOTAutograd's
forward and backward, and Triton's kernels under triton/): pointed at the run folder's compile_cache/, or at the folder
a site names (train.compile_cache_dir), they outlive the node. Inductor's own keys hold torch's version, the device,
the graph and its settings, so a changed model, torch or GPU misses and compiles afresh: nothing stale is loaded.

The first step compiles (torch.compile is lazy); how long it took and what the caches served go to the attempt's
start-up breakdown (launch.run.startup): compile_s, compile_cache_hits, compile_cache_misses."""
from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

from gpt.config.train import TrainConfig
from gpt.run_folder import RunFolder
from gpt.train.hooks import LoopHook, RunningLoop

# read each time Inductor opens its cache (torch._inductor.runtime.cache_dir_utils)
CACHE_DIR = "TORCHINDUCTOR_CACHE_DIR"
# (counter group, name) of Inductor's and AOTAutograd's cache lookups (torch._dynamo.utils.counters)
HITS = (("inductor", "fxgraph_cache_hit"), ("aot_autograd", "autograd_cache_hit"))
MISSES = (("inductor", "fxgraph_cache_miss"), ("aot_autograd", "autograd_cache_miss"))


def cache_folder(train: TrainConfig, run_dir: Path) -> Path:
    return Path(train.compile_cache_dir).expanduser() if train.compile_cache_dir else RunFolder(run_dir).compile_cache


def point_caches(train: TrainConfig, run_dir: Path, environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Point Inductor's caches at the run's folder before anything compiles; None when the run does not compile."""
    if not train.compile:
        return None
    folder = cache_folder(train, run_dir)
    environ[CACHE_DIR] = str(folder)
    return folder


def compile_counts() -> dict[str, float]:
    """Seconds this process spent compiling (Dynamo's frames and their backward), and its cache hits and misses."""
    from torch._dynamo.utils import calculate_time_spent, counters

    return {"compile_s": calculate_time_spent()["total_wall_time"],
            "compile_cache_hits": sum(counters[group][name] for group, name in HITS),
            "compile_cache_misses": sum(counters[group][name] for group, name in MISSES)}


class CompileRecord(LoopHook):
    """The first step's compile (the attempt's first step: torch.compile compiles where a graph first runs), put in the
    loop's start-up phases; after later steps a recompile is the loop's business, not start-up's."""

    def __init__(self, train: TrainConfig, run_dir: Path):
        self.folder = point_caches(train, run_dir)
        self.loop: RunningLoop | None = None
        self.before: dict[str, float] = {}

    def started(self, loop: RunningLoop) -> None:
        if self.folder is not None:
            self.loop, self.before = loop, compile_counts()

    def after_step(self, step: int) -> None:
        if self.loop is None:
            return
        after = compile_counts()
        self.loop.startup.update({k: after[k] - self.before[k] for k in after})
        self.loop = None
