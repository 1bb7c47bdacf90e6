"""Will a save fit: a checkpoint save's time estimated at planning, from the bytes each rank writes (the fit check's
estimate of the parameters and optimizer state) and the rate the run's newest checkpoint was saved at (its
meta.json), against what the scheduler leaves a save: the grace time of a preemption (the backend says it,
launch.backends.Backend.preemption_grace_s) and the warning's lead before the time limit (cluster.signal_delay_s).
A save that would not fit is said in one line, with what would; a warning, never a refusal: the rate is one save's,
and a disk's speed varies. Torch-free."""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from gpt.checkpoint.store import last_save_rate
from gpt.config.model import ModelConfig
from gpt.config.train import TrainConfig
from gpt.parallel.layout import ParallelDims
from gpt.parallel.memory_estimate import estimate
from gpt.resilience.goodput import window_needed
from gpt.run_folder import RunFolder

log = logging.getLogger(__name__)

# Bytes a rank writes per second before the run has measured a save: half of what llama_1b's final save reached on
# an H200's local disk by the path before staging (about 0.5 GB/s, issue 58); a shared file system's share per rank
# can be lower still. The run's own rate replaces it from its first save on.
DEFAULT_RATE = 0.25e9
# A preemption's signal comes during a step: the step under way, and the commit, come before and after the write.
PREEMPTION_MARGIN = 1.5


@dataclass(frozen=True)
class SaveCost:
    bytes_per_rank: float
    rate: float  # bytes per second per rank
    source: str  # where the rate comes from
    extra_s: float = 0.0  # debug.save_sleep_s: a test's sleep inside the save

    @property
    def seconds(self) -> float:
        return self.bytes_per_rank / self.rate + self.extra_s

    def describe(self) -> str:
        extra = f", plus debug.save_sleep_s={self.extra_s:g}" if self.extra_s else ""
        return f"{self.bytes_per_rank / 1e9:.2f} GB per rank at {self.rate / 1e9:.2f} GB/s, {self.source}{extra}"


def rank_save_bytes(model: ModelConfig, train: TrainConfig, strategy, world_size: int) -> float:
    """Bytes one rank writes at a save: the parameters and optimizer state of the whole model (as one rank would
    hold them) over the ranks, since DCP spreads replicated state over its holders and sharded state is each one's."""
    whole = estimate(model, dataclasses.replace(train, micro_batch_size=1), strategy, ParallelDims(), 1)
    return (whole.params + whole.optimizer) / world_size


def save_cost(bytes_per_rank: float, run_dir: Path, extra_s: float = 0.0) -> SaveCost:
    """The save's cost at the rate of the run's newest checkpoint, or DEFAULT_RATE before one."""
    measured = last_save_rate(RunFolder(run_dir).checkpoints)
    if measured is None:
        return SaveCost(bytes_per_rank, DEFAULT_RATE, "a default until the run has saved once", extra_s)
    rate, step = measured
    return SaveCost(bytes_per_rank, rate, f"measured at step {step}'s save", extra_s)


def unfit_saves(cost: SaveCost, grace: tuple[int, str] | None, lead_s: float | None,
                async_save: bool) -> list[str]:
    """One line for each window a save does not fit: a preemption's grace time (seconds, where it is set) and the
    time-limit warning's lead; each says what would fit."""
    lines = []
    need = PREEMPTION_MARGIN * cost.seconds
    if grace is not None and need > grace[0]:
        interval = "a shorter checkpoint.interval_minutes" if async_save else \
            "checkpoint.async=true with a shorter checkpoint.interval_minutes"
        lines.append(f"a checkpoint save takes about {cost.seconds:.1f} s here ({cost.describe()}), about {need:.0f} s "
                     f"with the step under way, longer than the {grace[0]} s a preemption leaves ({grace[1]}): a "
                     f"preempted attempt would lose what it trained since its previous checkpoint. What would fit: "
                     f"fewer bytes per rank (more ranks, strategy=fsdp), a partition or QOS with a longer GraceTime, "
                     f"or less to lose ({interval})")
    window = window_needed(0.0, cost.seconds)
    if lead_s is not None and window > lead_s:
        lines.append(f"cluster.signal_delay_s={lead_s:g} may be too short for the save at the time limit: it takes "
                     f"about {cost.seconds:.1f} s ({cost.describe()}), and with the step and the requeue about "
                     f"{window:.0f} s; what would fit: an earlier signal, cluster.signal_delay_s="
                     f"{math.ceil(window / 30) * 30}")
    return lines


def check_save_time(run, model: ModelConfig, train: TrainConfig, run_dir: Path, backend, world_size: int) -> None:
    """Planning's save-time check of `run` (a LaunchConfig) on `backend`: its lines logged as warnings. A run whose
    ranks do not save at a signal (preemption.enabled=false) is not checked, nor a time limit that sends none
    (cluster.signal_delay_s=0)."""
    if not run.preemption.enabled:
        return
    extra = run.debug.save_sleep_s or 0.0
    cost = save_cost(rank_save_bytes(model, train, run.strategy, world_size), run_dir, extra)
    for line in unfit_saves(cost, backend.preemption_grace_s(run), run.cluster.signal_delay_s or None,
                            run.checkpoint.async_save):
        log.warning("%s", line)
