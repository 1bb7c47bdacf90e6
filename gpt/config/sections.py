"""The run's own sections (checkpoint, preemption, rendezvous, watchdog, health, metrics, debug) and their checks:
a bad value is one line naming the key, the value and what is valid, before any job is submitted or any rank
started. Torch-free: the launcher checks them on a login node."""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

from gpt.config.parse import renamed
from gpt.errors import ConfigError


def signal_names(key: str, names: Any) -> tuple[str, ...]:
    """Signal names that can be caught (never KILL or STOP), as Python names them: ('SIGTERM', 'SIGUSR2')."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        names = [names]
    out = []
    for name in names:
        text = str(name).upper()
        text = text if text.startswith("SIG") else "SIG" + text
        if not isinstance(getattr(signal, text, None), signal.Signals) or text in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(key, name, "signal names that can be caught, e.g. [SIGTERM, SIGUSR2]")
        out.append(text)
    return tuple(out)


def at_least(key: str, value: float | None, minimum: float, what: str, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if value is None or value < minimum:
        raise ConfigError(key, value, what)


def seconds(key: str, value: Any, auto: bool = False) -> None:
    """A positive number of seconds (or `auto`, where the key has one)."""
    if auto and value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1e-3:
        raise ConfigError(key, value, "a positive number of seconds" + (", or auto" if auto else ""))


@dataclass(frozen=True)
class CheckpointConfig:
    interval_steps: int = 500  # 0: only at the end
    # also every N minutes (rank 0's clock, agreed by all ranks); auto: Young/Daly (gpt.resilience.goodput);
    # a Slurm job's cluster.time_min must be longer
    interval_minutes: float | str | None = None
    keep: int = 3  # the newest K complete checkpoints are kept
    async_save: bool = renamed("async", False)  # dcp.async_save on a gloo group of its own; training goes on
    # a save that storage refuses (disk full, quota): stop (the previous checkpoint is kept), or continue training
    # and try again at the next interval (the final save still stops the run when it fails)
    on_save_error: str = "stop"
    thread_count: int = 4  # files each rank writes at once (DCP's FileSystemWriter threads)
    # a synchronous save on a GPU (preemption, time limit, the final one) copies the state into host buffers kept
    # from save to save, pinned, then writes from there (the asynchronous saves' buffers); false: the writer copies
    # from the device a few MB at a time, and no host memory of the state's size is held
    staging: bool = True
    # torch.save's CRC32 of every record in a shard: it protects nothing the manifest's sizes and DCP's offsets do
    # not already check at load, and costs a pass over every byte
    crc32: bool = False
    # the final checkpoint of a finished run holds the weights alone (TorchTitan's last_save_model_only), in
    # final_dtype (fp32 or bf16): what export, evaluation and generation read. A preemption's or time limit's save
    # keeps the optimizer; a run continued past its max_steps resumes from the newest checkpoint that holds it
    final_model_only: bool = False
    final_dtype: str = "fp32"

    def validate(self) -> None:
        at_least("checkpoint.thread_count", self.thread_count, 1, "a positive number of writer threads")
        if self.final_dtype not in ("fp32", "bf16"):
            raise ConfigError("checkpoint.final_dtype", self.final_dtype, "fp32 or bf16")
        if self.final_dtype != "fp32" and not self.final_model_only:
            raise ConfigError("checkpoint.final_dtype", self.final_dtype, "fp32 unless checkpoint.final_model_only="
                              "true (a checkpoint that holds its optimizer keeps the weights it trains on)")
        if self.on_save_error not in ("stop", "continue"):
            raise ConfigError("checkpoint.on_save_error", self.on_save_error, "stop or continue")
        at_least("checkpoint.interval_steps", self.interval_steps, 0,
                 "0 (only at the end) or a positive number of steps")
        minutes = self.interval_minutes
        if minutes not in (None, "auto") and (isinstance(minutes, (bool, str)) or minutes <= 0):
            raise ConfigError("checkpoint.interval_minutes", minutes, "a positive number of minutes, auto, or null")
        at_least("checkpoint.keep", self.keep, 1, "a positive number of checkpoints to keep")



@dataclass(frozen=True)
class PreemptionConfig:
    enabled: bool = True
    signals: tuple[str, ...] = ("SIGTERM", "SIGUSR2")  # each only sets a flag; never SIGUSR1 (NCCL may use it)
    max_restarts: int = 10  # the job's own requeues (the scheduler's restart count); its REQUEUE preemptions: past it
    # a lost rank, a hang or a failed health check restarts the ranks inside the allocation (no requeue) at most this
    # many times per attempt of the job (launch.recovery.rounds); 0: always requeue
    in_job_restarts: int = 3
    # the next round's rank started ahead, its imports done (launch.recovery.standby), so that an in-job restart or a
    # spare pays no interpreter start: auto on GPU ranks, whose node's CPUs have room for it; not on CPU ranks, which
    # compute on every CPU the task has (there its imports took CPU from training on every round, for a restart's
    # few seconds saved); true or false to choose
    standby_rank: bool | str = "auto"
    # a node lost with no spare left (cluster.spare_nodes): auto restarts inside the allocation on the nodes left, the
    # data-parallel size shrunk and the global batch kept by more accumulation (launch.recovery.shrink), down to
    # min_nodes; never requeues. Opt-in: the run then trains slower than its time budget planned, its job runs with
    # --no-kill, and its losses match an unshrunk run's only to rounding (a sum over fewer ranks)
    shrink: str = "never"
    min_nodes: int = 1

    def __post_init__(self) -> None:  # as Python names them: TERM -> SIGTERM
        object.__setattr__(self, "signals", signal_names("preemption.signals", list(self.signals)))

    def validate(self) -> None:
        at_least("preemption.max_restarts", self.max_restarts, 0, "an integer >= 0")
        at_least("preemption.in_job_restarts", self.in_job_restarts, 0, "an integer >= 0")
        if self.standby_rank not in (True, False, "auto"):
            raise ConfigError("preemption.standby_rank", self.standby_rank, "auto, true or false")
        if self.shrink not in ("auto", "never"):
            raise ConfigError("preemption.shrink", self.shrink, "auto or never")
        at_least("preemption.min_nodes", self.min_nodes, 1, "an integer >= 1 (the fewest nodes a run shrinks to)")

    def standby(self, device: str) -> bool:
        """Whether each task keeps the next round's rank started ahead, for ranks on `device` (cpu or cuda)."""
        return device == "cuda" if self.standby_rank == "auto" else bool(self.standby_rank)


@dataclass(frozen=True)
class RendezvousConfig:
    # every rank must join the process group within this, else the missing are named: 300 s, as torch's store waits,
    # for nodes that import from a busy shared file system or unpack a container image
    timeout_s: float | None = 300.0

    def validate(self) -> None:
        at_least("rendezvous.timeout_s", self.timeout_s, 1e-3, "a positive number of seconds, or null", none_ok=True)


@dataclass(frozen=True)
class WatchdogConfig:
    """How long a rank may make no progress before its watchdog (launch.recovery.watchdog) reports a hang and ends the
    attempt (RUN_DIR/hang-*.txt). Each budget counts from the rank's last progress mark (a step, a collective entered
    or left, a save, an evaluation batch); startup_s bounds each phase of start-up in turn (joining, the health checks,
    building the model, loading a checkpoint, the first step and its compile), not their sum, which grows with the
    model and the world."""

    enabled: bool = True
    startup_s: float = 600.0
    step_s: float | str = "auto"  # auto: max(step_floor_s, step_factor x p99 of this attempt's step times)
    step_floor_s: float = 60.0
    step_factor: float = 10.0
    # auto: max(save_floor_s, step_factor x the longest save of this attempt); save_first_s until one was measured,
    # and for the final save (synchronous even where the others are asynchronous)
    save_s: float | str = "auto"
    save_floor_s: float = 60.0
    save_first_s: float = 600.0
    eval_s: float = 300.0
    interval_s: float = 1.0  # how often the watchdog looks, and writes this rank's heartbeat
    collective_timeout_s: float | str = "auto"  # the process group's own timeout, a backstop behind the watchdog

    def validate(self) -> None:
        for key in ("startup_s", "step_floor_s", "save_floor_s", "save_first_s", "eval_s", "interval_s"):
            seconds(f"watchdog.{key}", getattr(self, key))
        seconds("watchdog.step_s", self.step_s, auto=True)
        seconds("watchdog.save_s", self.save_s, auto=True)
        seconds("watchdog.collective_timeout_s", self.collective_timeout_s, auto=True)
        at_least("watchdog.step_factor", self.step_factor, 1.0, "a factor >= 1")

    def longest_budget_s(self) -> float:
        """The longest fixed budget: a rank past its own budget waits no longer than this for a slower peer."""
        saves = [self.save_first_s, self.save_floor_s] if self.save_s == "auto" else [float(self.save_s)]
        steps = [self.step_floor_s] + ([float(self.step_s)] if self.step_s != "auto" else [])
        return max([self.startup_s, self.eval_s, *saves, *steps])

    def process_group_timeout(self) -> float:
        """auto: a minute longer than the longest fixed watchdog budget, so the watchdog always speaks first;
        without a watchdog, torch's usual 600 s."""
        if self.collective_timeout_s != "auto":
            return float(self.collective_timeout_s)
        if not self.enabled:
            return 600.0
        return self.longest_budget_s() + 60.0



@dataclass(frozen=True)
class HealthConfig:
    """Node health checks before every attempt trains (launch.recovery.health): on CPU each node's matmul speed
    (nodes one after another) and the preflight all-reduce; on GPUs each GPU's matmul speed and the intra- and
    inter-node bus bandwidth; a storage check on both."""

    enabled: bool = True
    min_fraction: float = 0.8  # a node below this share of the median node's speed, or failing storage, is named
    action: str = "warn"  # or exclude: the job requeues itself without the flagged nodes (Slurm)
    matmul_size: int = 256  # on CPU
    rounds: int = 3  # CPU: a node below min_fraction of the fastest takes another turn, up to this many; best kept
    gpu_matmul_size: int = 8192  # on GPUs, in bf16: large enough to keep every SM busy
    gpu_seconds: float = 1.0  # how long each GPU's matmuls take, all rounds together
    bus_mib: int = 128  # the all-reduce timed for bus bandwidth on GPUs (smaller ones measure latency)

    def validate(self) -> None:
        if not 0 <= self.min_fraction <= 1:
            raise ConfigError("health.min_fraction", self.min_fraction, "a fraction between 0 and 1")
        if self.action not in ("warn", "exclude"):
            raise ConfigError("health.action", self.action, "warn or exclude")
        at_least("health.matmul_size", self.matmul_size, 16, "a matrix size >= 16")
        at_least("health.rounds", self.rounds, 1, "a number of rounds >= 1")
        at_least("health.gpu_matmul_size", self.gpu_matmul_size, 8192, "a matrix size >= 8192 (smaller ones "
                 "leave a GPU idle between launches)")
        if not self.gpu_seconds > 0:
            raise ConfigError("health.gpu_seconds", self.gpu_seconds, "a number of seconds > 0")
        at_least("health.bus_mib", self.bus_mib, 128, "a size in MiB >= 128 (smaller all-reduces measure latency)")



@dataclass(frozen=True)
class StragglerConfig:
    """The `stragglers` section: straggler detection (gpt.resilience.stragglers) on each log window's per-rank step
    times, and how much of it the metrics records hold."""

    threshold_pct: float = 20.0  # a rank's busy time this far above the median
    windows: int = 3  # ...for this many log windows in a row: a straggler
    top_k: int = 3  # the slowest ranks listed in each window's record
    ema_alpha: float = 0.3  # the newest window's weight in the lag's moving average
    min_excess_s: float = 0.0  # and this many seconds above it (noise)
    per_rank_tags_max: int = 64  # per-rank TensorBoard tags only up to this world size (else top-k only)
    # or exclude: save and requeue without a straggler's host, when the time it would cost over the remaining steps
    # exceeds a save and a restart (measured in this run; gpt.resilience.exclusion)
    action: str = "warn"

    def validate(self) -> None:
        checks = (("threshold_pct", self.threshold_pct, self.threshold_pct > 0, "> 0"),
                  ("windows", self.windows, self.windows >= 1, ">= 1"),
                  ("top_k", self.top_k, self.top_k >= 0, ">= 0"),
                  ("ema_alpha", self.ema_alpha, 0 < self.ema_alpha <= 1, "in (0, 1]"),
                  ("action", self.action, self.action in ("warn", "exclude"), "warn or exclude"))
        for key, value, ok, valid in checks:
            if not ok:
                raise ConfigError(f"stragglers.{key}", value, f"must be {valid}")



@dataclass(frozen=True)
class DebugConfig:
    """Fault injection for tests and demonstrations only (gpt.resilience.faults); all off by default, and with the
    defaults a run is never changed."""

    delay_rank: int | None = None  # this rank sleeps delay_s every step (to see straggler detection work)
    delay_s: float = 0.0
    save_sleep_s: float = 0.0  # a sleep inside a checkpoint save, before it is committed (tests kill a run mid-write)
    save_sleep_step: int | None = None  # ...only in the save of this step (null: every save)
    signal_at_step: int | list[int] | None = None  # the run stops before this step (or these): a signal a step ahead
    signal_rank: int = 0
    signal_name: str = "SIGUSR2"
    unreadable_rank: int | None = None  # this rank cannot read the newest checkpoint
    hang_rank: int | None = None  # this rank hangs in the run's first attempt, at hang_step (null: before it starts)
    hang_step: int | None = None
    hang_every_attempt: bool = False  # ...in every attempt, not only the first (a hang that a restart cannot fix)
    kill_rank: int | None = None  # this rank kills itself (SIGKILL) at kill_step, in the run's first attempt
    kill_step: int = 0
    abort_on_collective_error: bool = False  # a rank whose collective fails aborts (SIGABRT), as NCCL ends survivors
    straggler_rank: int | None = None  # this rank lags by straggler_s per step, in the run's first attempt only
    straggler_s: float = 0.0
    slow_node: int | None = None  # this node (its index in the job) is 3x slower in the health check, first attempt
    fill_disk_step: int | None = None  # rank 0 fills the run folder's file system before this step, first attempt
    # nan_rank's loss is NaN on the batch of this step (on a pipeline: a rank of the last stage); a rollback passes
    # over it (divergence.policy=rollback)
    nan_at_step: int | None = None
    nan_rank: int = 0
    spike_at_step: int | None = None  # spike_rank's loss is multiplied by spike_factor on the batch of this step
    spike_factor: float = 100.0
    spike_rank: int | None = None  # null: every rank
    # The ranks of a node share its GPUs over gloo's CUDA collectives, NCCL never started (it refuses two ranks on
    # one GPU): two ranks on one GPU run ddp, fsdp, tp and async checkpointing on real CUDA tensors, for debugging
    # only (no NCCL timeline, aborts or speed). launch.planning.shared_gpu says what it refuses.
    share_gpu: bool = False

    def validate(self) -> None:
        ranks = ("delay_rank", "unreadable_rank", "hang_rank", "kill_rank", "straggler_rank", "signal_rank", "nan_rank",
                 "spike_rank")
        for key in ranks:
            at_least(f"debug.{key}", getattr(self, key), 0, "a rank (>= 0), or null", none_ok=True)
        for key in ("save_sleep_step", "hang_step", "kill_step", "fill_disk_step", "nan_at_step", "spike_at_step"):
            at_least(f"debug.{key}", getattr(self, key), 0, "a step (>= 0), or null", none_ok=True)
        for key in ("delay_s", "save_sleep_s", "straggler_s"):
            at_least(f"debug.{key}", getattr(self, key), 0, "seconds >= 0")
        at_least("debug.spike_factor", self.spike_factor, 0, "a factor >= 0")
        at_least("debug.slow_node", self.slow_node, 0, "a node index, or null", none_ok=True)
        for step in self.signal_steps:
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ConfigError("debug.signal_at_step", self.signal_at_step, "a step, a list of steps, or null")

    def __post_init__(self) -> None:  # as Python names it: usr2 -> SIGUSR2
        object.__setattr__(self, "signal_name", signal_names("debug.signal_name", self.signal_name)[0])

    @property
    def signal_steps(self) -> list[int]:
        at = self.signal_at_step
        return [] if at is None else list(at) if isinstance(at, (list, tuple)) else [at]
