"""The training loop that runs in every rank: model, strategy, data, metrics, evaluation, checkpoints."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from gpt.checkpoint import Checkpointer
from gpt.config import ModelConfig
from gpt.data import check_vocab
from gpt.data.loader import TokenDataset, TrainBatches, ValBatches
from gpt.distributed import DistEnv, pick_device
from gpt.flops import flops_per_token, mfu, param_count, peak_flops
from gpt.metrics import MetricsWriter, memory_stats
from gpt.model import GPT
from gpt.optim import lr_at
from gpt.parallel import build_strategy
from gpt.parallel.base import StepResult
from gpt.stragglers import StragglerConfig, StragglerMonitor, injected_delay, timed_wait
from gpt.train_config import TrainConfig

log = logging.getLogger(__name__)


def model_config(cfg: DictConfig, data_dir: Path) -> ModelConfig:
    """The model's config with the vocabulary filled in from the prepared data's tokenizer when unset."""
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    vocab = check_vocab(mcfg.vocab_size, data_dir)
    return dataclasses.replace(mcfg, vocab_size=mcfg.vocab_size or vocab)


@dataclass
class Window:
    """Time and steps since the last metrics record."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    data_s: float = 0.0
    comm_s: float = 0.0  # waiting for the other ranks at the step's barrier


class Trainer:
    def __init__(self, cfg: DictConfig, env: DistEnv, run_dir: Path):
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        self.train = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))
        self.device = pick_device(self.train.device, env)
        data_dir = Path(cfg.data.dir)
        self.model_cfg = model_config(cfg, data_dir)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.strategy = build_strategy(cfg.strategy, env, self.device, self.train.precision)
        self.strategy.setup(GPT(self.model_cfg), self.train.lr, self.train.weight_decay, tuple(self.train.betas))
        if self.train.compile:
            self.strategy.model = torch.compile(self.strategy.model)

        self.micro_batch, self.n_micro = self.train.micro_batches(self.strategy.dp_size)
        block = self.model_cfg.block_size
        self.batches = TrainBatches(TokenDataset(data_dir, "train"), cfg.seed, block, self.train.global_batch_size,
                                    self.micro_batch, self.strategy.dp_rank, self.strategy.dp_size, self.device)
        self.val = ValBatches(TokenDataset(data_dir, "val"), cfg.seed, block, self.micro_batch * self.strategy.dp_size,
                              self.train.eval_batches, self.strategy.dp_rank, self.strategy.dp_size, self.device)

        self.tokens_per_step = self.train.global_batch_size * block
        self.flops_per_token = flops_per_token(self.model_cfg, block)
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak = peak_flops(device_name, self.train.precision)
        self.metrics = MetricsWriter(run_dir, env.rank, env.hostname)
        self.stragglers = StragglerMonitor(env.world_size, config=StragglerConfig.from_metrics_cfg(cfg.get("metrics")),
                                           host=env.hostname, device=self.device if self.device.type == "cuda" else None)
        self.debug = cfg.get("debug") or {}
        self.checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep, env.is_main)
        self.step = 0
        self.saved_step: int | None = None
        self.window = Window()

    # --- reporting ------------------------------------------------------------------------------------
    def banner(self) -> str:
        counts = param_count(self.model_cfg)
        world = self.env.world_size
        if self.peak:
            at_half = f"{0.5 * self.peak * world / self.flops_per_token:,.0f} tokens/s"
        else:
            at_half = f"n/a (no peak FLOP/s known for {self.device.type}/{self.train.precision})"
        lines = [
            f"model        {self.model_cfg.name}: {counts['total'] / 1e6:.2f}M parameters "
            f"({counts['non_embedding'] / 1e6:.2f}M non-embedding), {self.flops_per_token / 1e6:.1f} MFLOPs/token",
            f"strategy     {self.strategy.describe()} on {world} rank(s), {self.env.num_nodes} node(s)",
            f"device       {self.device} ({self.train.precision})",
            f"batch        {self.train.global_batch_size} x {self.model_cfg.block_size} = {self.tokens_per_step:,} "
            f"tokens/step; {self.micro_batch} per rank x {self.n_micro} micro-steps",
            f"at 50% MFU   {at_half}",
            f"run folder   {self.run_dir}",
        ]
        return "\n".join(lines)

    def record(self, window_s: float, result: StepResult, lr: float) -> dict[str, Any]:
        window_steps = self.window.steps
        tokens_per_s = window_steps * self.tokens_per_step / window_s
        per_rank = tokens_per_s / self.env.world_size
        values: dict[str, Any] = {
            "loss": self.strategy.mean_over_dp(result.loss).item(),
            "lr": lr,
            "grad_norm": result.grad_norm.item(),
            "step_time_s": window_s / window_steps,
            "data_time_s": self.window.data_s / window_steps,
            "comm_s": self.window.comm_s / window_steps,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_rank": per_rank,
            "tokens_seen": (self.step + 1) * self.tokens_per_step,
        }
        # A rank computes flops_share() of the FLOPs of each token its replica trains on (pipeline stages split them).
        replica_tokens_per_s = tokens_per_s / self.strategy.dp_size
        values["mfu"] = mfu(replica_tokens_per_s, self.flops_per_token * self.strategy.flops_share(), self.peak)
        values["param_bytes"] = self.strategy.parameter_bytes()  # held by this rank: about total / shards when sharded
        values.update(memory_stats(self.device))
        values.update(result.clock.seconds() if result.clock else {})  # this step's phases, a sample of the window
        values.update(result.layer_grad_norms or {})
        stragglers = self.stragglers.update(self.step, values)  # a collective: every rank, every window
        if self.env.is_main:
            values.update(stragglers.metrics())
            StragglerMonitor.log_events(stragglers, log)
        self.metrics.write(self.step, values)
        return values

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate(self) -> float:
        self.strategy.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        for x, y in self.val:
            total += self.strategy.forward_loss(x, y)
            count += 1
        self.strategy.model.train()
        loss = self.strategy.mean_over_dp(total / max(count, 1)).item()
        self.metrics.write(self.step, {"loss": loss}, kind="val")
        return loss

    # --- the loop -------------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.step * self.tokens_per_step,
            "model": dataclasses.asdict(self.model_cfg),
            "data_dir": str(self.cfg.data.dir),
            "world_size": self.env.world_size,
            "strategy": self.strategy.name,
        }

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step; at log intervals also the metrics record of the window it closes."""
        t = self.train
        lr = lr_at(self.step, t.lr, t.min_lr, t.warmup_steps, t.decay_end)
        injected_delay(self.env.rank, self.debug.get("delay_rank"), self.debug.get("delay_s", 0.0))
        data_start = time.perf_counter()
        micro = [self.batches.get(self.step, m) for m in range(self.n_micro)]
        self.window.data_s += time.perf_counter() - data_start
        # A fast rank waits here for a slow one: that is communication time, not its own work.
        self.window.comm_s += timed_wait(self.device if self.device.type == "cuda" else None)
        log_now = (self.step + 1) % t.log_interval == 0 or self.step == t.max_steps - 1
        result = self.strategy.train_step(micro, self.n_micro, lr, t.grad_clip,
                                          layer_norms=log_now and t.layer_grad_norms)
        self.window.steps += 1
        values = None
        if log_now:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            values = self.record(time.perf_counter() - self.window.start, result, lr)
            self.window = Window()
        self.step += 1
        return values

    def fit(self) -> dict[str, float]:
        t = self.train
        if self.env.is_main:
            log.info("\n%s", self.banner())
            self.metrics.text("banner", "    " + self.banner().replace("\n", "\n    "))
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not (self.env.is_main and t.progress),
                   dynamic_ncols=True, desc="train")
        summary: dict[str, float] = {}
        self.window = Window()
        while self.step < t.max_steps:
            values = self.train_step()
            bar.update(1)
            if values:
                summary.update(train_loss=values["loss"], tokens_per_s=values["tokens_per_s"])
                bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:,.0f}")
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.max_steps):
                summary["val_loss"] = self.evaluate()
                if self.env.is_main:
                    bar.write(f"step {self.step}: val loss {summary['val_loss']:.4f}")
                self.window.start = time.perf_counter()  # evaluation time is not training time
            if self.cfg.checkpoint.interval_steps and self.step % self.cfg.checkpoint.interval_steps == 0:
                self.save()
        bar.close()
        if self.saved_step != self.step:
            self.save()
        self.metrics.close()
        return summary

    def save(self) -> Path:
        path = self.checkpointer.save(self.step, self.strategy, self.checkpoint_meta())
        self.saved_step = self.step
        log.info("saved checkpoint %s", path)
        return path
