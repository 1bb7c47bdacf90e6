"""What the steps tell the user and the run folder: the start-up banner, each log window's metrics record
(throughput, MFU, memory, the straggler check and the exclusion decision it may lead to), and the progress bar."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gpt.config.model import ModelConfig
from gpt.config.train import TrainConfig
from gpt.config.sections import StragglerConfig
from gpt.collectives.process_group import DistEnv, from_rank0_object
from gpt.model.flops import flops_per_token, matmul_precision, mfu, param_count, peak_flops
from gpt.parallel.base import StepResult, Strategy
from gpt.parallel.memory_estimate import MemoryParts
from gpt.parallel.memory_held import FirstStepMemory
from gpt.resilience.exclusion import ExclusionDecision, decide
from gpt.resilience.goodput import PRIOR_SAVE_S, Spent
from gpt.resilience.stragglers import StragglerMonitor, WindowSummary
from gpt.train.metrics import MetricsWriter, memory_stats
from gpt.run_folder import RunFolder
from gpt.train.runinfo import cpu_affinity, cpu_list
from gpt.train.compute_probe import ComputeProbe, probe_waits
from gpt.train.step_timer import StepTimer, watch_compute_end

log = logging.getLogger(__name__)


@dataclass
class RunShape:
    """What the banner and the throughput figures are computed from."""

    env: DistEnv
    strategy: Strategy
    model_cfg: ModelConfig
    train: TrainConfig
    device: torch.device
    run_dir: Path
    micro_batch: int
    n_micro: int


class StepReporter:
    def __init__(self, shape: RunShape, metrics: MetricsWriter, stragglers: StragglerConfig | None, spent: Spent,
                 slow: Callable[[float], float] = lambda share: 0.0,
                 cannot_spare: Callable[[str], str] = lambda host: ""):
        self.shape, self.metrics, self.spent = shape, metrics, spent
        self.stragglers = StragglerMonitor(shape.env.world_size, config=stragglers, host=shape.env.hostname)
        self.env, self.strategy, self.model_cfg, self.train = shape.env, shape.strategy, shape.model_cfg, shape.train
        self.tokens_per_step = self.train.global_batch_size * self.model_cfg.block_size
        self.flops_per_token = flops_per_token(self.model_cfg, self.model_cfg.block_size)
        device = shape.device
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        self.peak = peak_flops(device_name, matmul_precision(self.train.precision, tf32))
        self.window = StepTimer(device)
        strategy = self.strategy
        self.waits_in_compute = strategy.traits().waits_in_compute(strategy.cfg, strategy.dims)
        self.probe = None  # where the step timer cannot tell the wait, devices are compared (gpt.train.compute_probe)
        if self.env.world_size > 1 and self.waits_in_compute:
            self.probe = ComputeProbe(self.model_cfg, shape.micro_batch * self.model_cfg.block_size, device,
                                      self.train.compute_precision, self.rank_step_flops(), slow)
        self.exclusion: ExclusionDecision | None = None  # a straggler's host to requeue without
        self.cannot_spare = cannot_spare  # why the scheduler could not requeue the job without that host ('': it could)
        # Gradients reduced over replicas after the backward's compute: a fast one's device waits there. Where the
        # waits are inside forward/backward, the compute probe judges them instead.
        if strategy.dp_size > 1 and not self.waits_in_compute:
            watch_compute_end(strategy.unwrapped, lambda: self.window)

    def new_window(self) -> None:
        """The log window starts again here (its steps were undone, or none ran yet)."""
        self.window = StepTimer(self.shape.device)

    def first_step_memory(self) -> FirstStepMemory:
        """The loop's hook that measures what the rank holds in its first step, recorded here (memory_held)."""
        return FirstStepMemory(self.strategy, self.shape.n_micro, self.memory_held)

    def rank_step_flops(self) -> float:
        """This rank's training FLOPs per step: its share of each token its replica trains on."""
        return self.flops_per_token * self.tokens_per_step / self.strategy.dp_size * self.strategy.flops_share()

    def banner(self) -> str:
        s = self.shape
        counts = param_count(self.model_cfg)
        world = self.env.world_size
        if self.peak:
            at_half = f"{0.5 * self.peak * world / self.flops_per_token:,.0f} tokens/s"
        else:
            at_half = f"n/a (no peak FLOP/s known for {s.device.type}/{self.train.precision})"
        lines = [
            f"model        {self.model_cfg.name}: {counts['total'] / 1e6:.2f}M parameters "
            f"({counts['non_embedding'] / 1e6:.2f}M non-embedding), {self.flops_per_token / 1e6:.1f} MFLOPs/token",
            f"strategy     {self.strategy.describe()} on {world} rank(s), {self.env.num_nodes} node(s)",
            f"layout       {self.strategy.dims.describe(self.env.local_world_size)}",
            f"device       {s.device} ({self.train.precision}), {torch.get_num_threads()} CPU thread(s) per "
            f"rank on CPUs {cpu_list(cpu_affinity())}",
            f"compute      attention {self.strategy.attention_kernel} (train.attention={self.train.attention}); "
            f"{self.compiled()}{self.memory_and_levers()}",
            f"batch        {self.train.global_batch_size} x {self.model_cfg.block_size} = {self.tokens_per_step:,} "
            f"tokens/step; {s.micro_batch} per rank x {s.n_micro} micro-steps",
            f"at 50% MFU   {at_half}",
            f"run folder   {s.run_dir}",
        ]
        return "\n".join(lines)

    def memory_and_levers(self) -> str:
        """What the compute line adds after compile: activation checkpointing, then the step's levers."""
        policy = self.train.activation_checkpointing
        levers = ["q, k and v in one matmul"] * self.train.fused_qkv + \
            [f"residual stream {self.train.residual_dtype}"] * (self.train.residual_dtype != "fp32")
        return ("" if policy == "none" else f"; activation checkpointing {policy}") + "".join(f"; {x}" for x in levers)

    def compiled(self) -> str:
        c = self.strategy.compile
        return f"torch.compile of the {'whole model' if c.scope == 'model' else 'blocks'}, mode {c.mode}" if c \
            else "eager"

    def show_banner(self) -> None:
        if self.env.is_main:
            log.info("\n%s", self.banner())
            self.metrics.text("banner", "    " + self.banner().replace("\n", "\n    "))

    def record(self, step: int, result: StepResult, lr: float) -> dict[str, Any]:
        """The metrics record of the window closed once `step` steps are done (every rank: the straggler check is a
        collective)."""
        if self.shape.device.type == "cuda":
            torch.cuda.synchronize(self.shape.device)
        window_s, window = time.perf_counter() - self.window.start, self.window
        tokens_per_s = window.steps * self.tokens_per_step / window_s
        values: dict[str, Any] = {
            "loss": self.strategy.mean_over_dp(result.loss).item(),
            "lr": lr,
            "grad_norm": result.grad_norm.item(),
            **window.read(window_s),  # the step's parts, means over the window
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_rank": tokens_per_s / self.env.world_size,
            "tokens_seen": step * self.tokens_per_step,
        }
        # A rank computes flops_share() of the FLOPs of each token its replica trains on (tp and stages split them).
        replica_tokens_per_s = tokens_per_s / self.strategy.dp_size
        values["mfu"] = mfu(replica_tokens_per_s, self.flops_per_token * self.strategy.flops_share(), self.peak)
        values["param_bytes"] = self.strategy.parameter_bytes()  # held by this rank: about total / shards when sharded
        values.update(memory_stats(self.shape.device))
        values.update(result.layer_grad_norms or {})
        if self.probe is not None:  # after the window's time: the probe is not training time
            values["probe_s"] = self.probe.seconds()
        figures = self.stragglers.gather(values)  # a collective: every rank, every window
        if self.waits_in_compute:  # the waits inside forward/backward, from every rank's probe
            figures = probe_waits(figures)
            values.update({k: figures[self.env.rank][k] for k in ("comm_s", "compute_s", "hidden_wait_s")
                           if figures[self.env.rank].get(k) is not None})
        stragglers = self.stragglers.observe(step, figures)
        if self.env.is_main:
            values.update(stragglers.metrics())
            StragglerMonitor.log_events(stragglers, log)
        self.consider_exclusion(step, stragglers)
        self.metrics.write(step, values)
        self.window = StepTimer(self.shape.device)
        return values

    def memory_held(self, step: int, parts: MemoryParts) -> None:
        """What the rank holds after its first step (index `step`), by part: a metrics record of its own (kind
        "memory"), at the steps done then, as every record."""
        self.metrics.write(step + 1, parts.metrics(), kind="memory")
        if self.env.is_main:
            log.info("memory held by rank 0 in its first step: %s", parts.describe())

    def consider_exclusion(self, step: int, summary: WindowSummary) -> None:
        """stragglers.action=exclude: when a rank becomes a straggler, remove its host if that pays
        (gpt.resilience.exclusion); the run then saves and stops, and the worker requeues the job without that host."""
        events = [e for e in summary.events if e.kind == "straggler"]  # the same on every rank
        if self.stragglers.config.action != "exclude" or not events:
            return
        worst = max(events, key=lambda e: e.busy_s - e.median_s)
        save_s = self.spent.save_s / self.spent.saves if self.spent.saves else PRIOR_SAVE_S
        mine = decide(worst, worst.median_s, self.train.max_steps - step, save_s,
                      RunFolder(self.shape.run_dir).attempts.read())
        if self.env.is_main and mine.pays and (kept := self.cannot_spare(worst.host)):  # before every rank stops
            mine = replace(mine, kept=kept)
        decision = ExclusionDecision(**from_rank0_object(asdict(mine)))
        if self.env.is_main:
            log.warning("%s", decision.message())
        if decision.pays:
            self.exclusion = decision


class ProgressBar:
    """Rank 0's progress: a bar on a terminal; in a log file (a batch job, nohup) one line per log interval."""

    def __init__(self, train: TrainConfig, step: int, is_main: bool):
        self.train, self.is_main = train, is_main
        self.live = is_main and train.progress and sys.stderr.isatty()
        self.bar = tqdm(total=train.max_steps, initial=step, disable=not self.live, dynamic_ncols=True, desc="train")

    def advance(self, step: int, values: dict[str, Any] | None) -> None:
        """One step done; `values`: the metrics record it closed, if any."""
        self.bar.update(1)
        if not values:
            return
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:,.0f}")
        if self.is_main and self.train.progress and not self.live:
            log.info("step %d/%d: loss %.4f, %s tokens/s", step, self.train.max_steps, values["loss"],
                     f"{values['tokens_per_s']:,.0f}")

    def write(self, text: str) -> None:
        if self.is_main:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
