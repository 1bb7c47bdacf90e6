"""The training loop that runs in every rank: model, strategy, data, metrics, evaluation, checkpoints."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from gpt import rng
from gpt.checkpoint import Checkpointer, all_ranks_ok, check_fingerprint, list_checkpoints, read_meta, resolve, verify
from gpt.config import ModelConfig
from gpt.data import check_vocab
from gpt.data.loader import TokenDataset, TrainBatches, ValBatches
from gpt.distributed import DistEnv, any_true, from_rank0_object, gather_objects, pick_device, side_group, timed_flags
from gpt.errors import UserError
from gpt.flops import flops_per_token, mfu, param_count, peak_flops
from gpt.metrics import MetricsWriter, layer_keys, memory_stats
from gpt.model import GPT
from gpt.optim import lr_at
from gpt.parallel import build_strategy
from gpt.parallel.traits import saved_format
from gpt.parallel.base import StepResult
from gpt.preemption import DEFAULT_SIGNALS, PreemptionFlag
from gpt.progress import PROGRESS
from gpt.exclusion import ExclusionDecision, decide
from gpt.faults import Faults
from gpt.goodput import (PRIOR_SAVE_S, Spent, interruption_rate, read_attempts, window_needed,
                         young_daly_minutes)
from gpt.run_config import CheckpointConfig, DebugConfig
from gpt.runinfo import cpu_affinity, cpu_list
from gpt.stragglers import StragglerConfig, StragglerMonitor, WindowSummary
from gpt.train_config import TrainConfig

log = logging.getLogger(__name__)


def model_config(cfg: DictConfig, data_dir: Path) -> ModelConfig:
    """The model's config with the vocabulary filled in from the prepared data's tokenizer when unset."""
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    vocab = check_vocab(mcfg.vocab_size, data_dir)
    return dataclasses.replace(mcfg, vocab_size=mcfg.vocab_size or vocab)


def use_tf32(device: torch.device, precision: str) -> None:
    """fp32 matmuls and convolutions on a GPU's TF32 tensor cores (what the MFU peaks for fp32 assume)."""
    if device.type == "cuda" and precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def build_model(cfg: ModelConfig, device: torch.device, seed: int) -> GPT:
    """The GPT built and initialised on `device` itself: no rank builds a full fp32 copy on the CPU first to move
    it (on the CPU these are the weights an eager build always gave). The same seed gives every rank the same
    weights."""
    torch.manual_seed(seed)
    with torch.device(device):
        return GPT(cfg)


@dataclass
class Window:
    """Time and steps since the last metrics record."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    data_s: float = 0.0
    comm_s: float = 0.0  # waiting for the other ranks at the step's barrier


class Trainer:
    def __init__(self, cfg: DictConfig, env: DistEnv, run_dir: Path, attempt: int = 1):
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        self.train = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))
        self.device = pick_device(self.train.device, env)
        data_dir = Path(cfg.data.dir)
        self.model_cfg = model_config(cfg, data_dir)

        self.startup: dict[str, float] = {}  # seconds per start-up phase, for the attempts log
        clock = time.perf_counter()
        PROGRESS.phase("startup", "building the model")
        use_tf32(self.device, self.train.precision)
        self.strategy = build_strategy(cfg, self.model_cfg, env, self.device, self.train.precision)
        model = build_model(self.model_cfg, self.device, cfg.seed)
        every = self.train.recompute_every()
        for i, block in enumerate(model.layers.values()):
            block.recompute = every > 0 and i % every == 0
        self.strategy.layer_keys = layer_keys(name for name, _ in model.named_parameters())
        self.strategy.setup(model, self.train.lr, self.train.weight_decay, tuple(self.train.betas))
        rng.seed_device(cfg.seed, env.rank)
        if self.train.compile:
            self.strategy.model = torch.compile(self.strategy.model)
        self.startup["model_s"], clock = time.perf_counter() - clock, time.perf_counter()

        self.micro_batch, self.n_micro = self.train.micro_batches(self.strategy.dp_size)
        block = self.model_cfg.block_size
        self.batches = TrainBatches(TokenDataset(data_dir, "train"), cfg.seed, block, self.train.global_batch_size,
                                    self.micro_batch, self.strategy.dp_rank, self.strategy.dp_size, self.device)
        self.val = ValBatches(TokenDataset(data_dir, "val"), cfg.seed, block, self.micro_batch * self.strategy.dp_size,
                              self.train.eval_batches, self.strategy.dp_rank, self.strategy.dp_size, self.device)
        self.startup["data_s"] = time.perf_counter() - clock

        self.tokens_per_step = self.train.global_batch_size * block
        self.flops_per_token = flops_per_token(self.model_cfg, block)
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak = peak_flops(device_name, self.train.precision)
        self.stragglers = StragglerMonitor(env.world_size, config=StragglerConfig.from_metrics_cfg(cfg.get("metrics")),
                                           host=env.hostname)
        # test-only injections
        self.faults = Faults(DebugConfig.from_cfg(cfg.get("debug") or {}), env.rank, attempt)
        self.ckpt = CheckpointConfig.from_cfg(cfg)
        preemption = cfg.get("preemption") or {}
        self.flag = (PreemptionFlag.installed(preemption.get("signals", DEFAULT_SIGNALS))
                     if preemption.get("enabled", True) else None)
        async_group = side_group() if self.ckpt.async_save and self.strategy.supports_async_save else None
        self.checkpointer = Checkpointer(run_dir / "checkpoints", self.ckpt.keep, env.is_main, env.rank,
                                         async_group=async_group, async_save=self.ckpt.async_save,
                                         before_commit=self.faults.before_commit)
        self.strategy.before_update = self.checkpointer.wait_staged
        self.step = 0
        self.first_step = 0
        self.saved_step: int | None = None
        self.eval_pending = False  # an evaluation a signal interrupted: the resumed run does it first
        self.stop_signal: str | None = None  # set on every rank once any rank got a preemption signal
        self.exclusion: ExclusionDecision | None = None  # a straggler's host to requeue without
        self.save_due = False  # checkpoint.interval_minutes elapsed (rank 0's clock, agreed in the step's all_reduce)
        self.last_save_time = time.monotonic()
        self.spent = Spent()  # where this attempt's time goes (goodput)
        self.interval_minutes = self.checkpoint_interval()
        clock = time.perf_counter()
        PROGRESS.phase("startup", "choosing and loading a checkpoint")
        self.resumed_from = self.resume()
        self.startup["checkpoint_load_s"] = time.perf_counter() - clock
        if self.resumed_from is not None:
            self.saved_step = self.step
        # from step 0 too: an attempt killed before its first checkpoint left records this one trains again
        self.metrics = MetricsWriter(run_dir, env.rank, env.hostname, resume_step=self.step,
                                     keep_val_at_resume=not self.eval_pending)
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
            f"layout       {self.strategy.dims.describe(self.env.local_world_size)}",
            f"device       {self.device} ({self.train.precision}), {torch.get_num_threads()} CPU thread(s) per "
            f"rank on CPUs {cpu_list(cpu_affinity())}",
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
        self.consider_exclusion(stragglers)
        self.metrics.write(self.step, values)
        return values

    def consider_exclusion(self, summary: WindowSummary) -> None:
        """metrics.straggler_action=exclude: when a rank becomes a straggler, remove its host if that pays
        (gpt.exclusion); the run then saves and stops, and the worker requeues the job without that host."""
        events = [e for e in summary.events if e.kind == "straggler"]  # the same on every rank
        if self.stragglers.config.action != "exclude" or not events:
            return
        worst = max(events, key=lambda e: e.busy_s - e.median_s)
        others = statistics.median(r.busy_s for r in summary.ranks if r.rank != worst.rank)
        save_s = self.spent.save_s / self.spent.saves if self.spent.saves else PRIOR_SAVE_S
        decision = from_rank0_object(decide(worst, others, self.train.max_steps - self.step - 1, save_s,
                                            read_attempts(self.run_dir)))
        if self.env.is_main:
            log.warning("%s", decision.message())
        if decision.pays:
            self.exclusion = decision

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        """The validation loss; None when a preemption signal interrupted it (the resumed run evaluates again)."""
        self.strategy.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        for x, y in self.val:
            if any_true(self.flag is not None and self.flag.raised):
                self.stop_signal = self.flag.signal_name or "SIGNAL(another rank)"
                self.eval_pending = True
                self.strategy.model.train()
                return None
            total += self.strategy.forward_loss(x, y)
            count += 1
        self.strategy.model.train()
        self.eval_pending = False
        loss = self.strategy.mean_over_dp(total / max(count, 1)).item()
        self.metrics.write(self.step, {"loss": loss}, kind="val")
        return loss

    # --- the loop -------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What must be equal for a checkpoint to continue this run exactly (max_steps may grow if the schedule
        does not depend on it: set train.decay_steps)."""
        t = self.train
        fp: dict[str, Any] = {f"model.{k}": v for k, v in dataclasses.asdict(self.model_cfg).items()}
        fp.update({"seed": self.cfg.seed, "train.global_batch_size": t.global_batch_size, "train.lr": t.lr,
                   "train.min_lr": t.min_lr, "train.warmup_steps": t.warmup_steps,
                   "train.decay_steps (or max_steps)": t.decay_end, "train.weight_decay": t.weight_decay,
                   "train.betas": list(t.betas), "train.grad_clip": t.grad_clip, "train.precision": t.precision})
        return fp

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.step * self.tokens_per_step,
            "model": dataclasses.asdict(self.model_cfg),
            "data_dir": str(self.cfg.data.dir),
            "data": {**self.batches.state_dict(), "step": self.step,
                     "samples_seen": self.step * self.train.global_batch_size},
            "world_size": self.env.world_size,
            "dp_size": self.strategy.dp_size,
            "strategy": self.strategy.name,
            "checkpoint_format": self.strategy.traits().checkpoint_format,
            "layout": self.strategy.dims.sizes(),
            "fingerprint": self.fingerprint(),
            "eval_pending": self.eval_pending,
            "time": time.time(),
        }

    def rank_state(self) -> dict[str, Any]:
        """This rank's own part of a checkpoint: its RNG streams, data position and grad scaler."""
        scaler = self.strategy.scaler
        return {"rank": self.env.rank, "world_size": self.env.world_size, "step": self.step, "rng": rng.capture(),
                "data": self.batches.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None}

    # --- resuming -------------------------------------------------------------------------------------
    def resume(self) -> Path | None:
        """resume=auto: the newest usable checkpoint of this run folder (an unusable one is skipped with a
        warning); resume=PATH: that checkpoint (or a run folder's newest), only to initialise a run that has no
        checkpoint of its own yet; resume=none: start over. Rank 0 chooses and every rank loads the same one."""
        mode = str(self.cfg.get("resume", "auto"))
        if mode.lower() in ("none", "false", "null"):
            return None
        own = list(reversed(list_checkpoints(self.checkpointer.root)))
        explicit = mode.lower() != "auto" and not own
        if mode.lower() != "auto" and own:
            log.info("resume=%s is not used: this run continues from its own checkpoints", mode)
        candidates = [resolve(Path(mode))] if explicit else own
        candidates = [Path(p) for p in from_rank0_object([str(p) for p in candidates])]
        skipped = []
        for i, path in enumerate(candidates):
            problem = self.readable_everywhere(path, newest=i == 0) or self.load_everywhere(path)
            if problem is None:
                if skipped:
                    log.warning("resumed from %s, older than the unusable newest checkpoint(s): %s", path,
                                "; ".join(skipped))
                return path
            if explicit:
                raise UserError(f"cannot resume from {path}: {problem}")
            log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, problem)
            skipped.append(f"{path.name}: {problem}")
        if skipped:
            raise UserError(f"no usable checkpoint in {self.checkpointer.root}: " + "; ".join(skipped) +
                            "; remove the broken ones, or start a new run under another name (run=NAME)")
        return None

    def readable_everywhere(self, path: Path, newest: bool) -> str | None:
        """None when every rank can read `path`; else which ranks cannot, and why (every rank takes part)."""
        mine = self.faults.unreadable(newest) or verify(path)
        problems = [f"rank {r} on {host}: {p}" for r, (host, p) in enumerate(gather_objects((self.env.hostname, mine)))
                    if p is not None]
        return "; ".join(problems) or None

    def load_everywhere(self, path: Path) -> str | None:
        """Load `path` on every rank; None when every rank did."""
        meta = read_meta(path)
        self.check_resumable(path, meta)
        try:
            self.strategy.load_state(path)
            problem = None
        except UserError:
            raise
        except Exception as e:  # a corrupt shard: DCP names it in its message
            why = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
            problem = f"loading failed: {why}"
        if not all_ranks_ok(problem is None):
            return problem or "another rank could not load its part"
        self.restore(path, meta)
        return None

    def check_resumable(self, path: Path, meta: dict[str, Any]) -> None:
        """This run's own checkpoint must match all of its settings; another run's, used to initialise this
        one (resume=PATH), only its model (the schedule may differ: fine-tuning, a longer run)."""
        saved, current = meta.get("fingerprint"), self.fingerprint()
        if self.checkpointer.root.resolve() not in path.resolve().parents and saved is not None:
            saved = {k: v for k, v in saved.items() if k.startswith("model.")}
            current = {k: v for k, v in current.items() if k.startswith("model.")}
        check_fingerprint(path, saved, current)
        written_by, world, saved = meta.get("strategy"), meta.get("world_size"), saved_format(meta)
        traits = self.strategy.traits()
        if saved != traits.checkpoint_format:
            raise UserError(f"checkpoint {path} was written by strategy={written_by} in the {saved} format, which "
                            f"does not load into strategy={self.strategy.name} ({traits.checkpoint_format}): resume "
                            f"with strategy={written_by}")
        if not traits.reshardable and world != self.env.world_size:
            raise UserError(f"checkpoint {path} was written by strategy={written_by} on {world} ranks and this run "
                            f"has {self.env.world_size}: its {saved} checkpoints cannot be resharded; resume on "
                            f"{world} ranks (or use a strategy whose DCP checkpoints reshard: ddp, fsdp, zero1, "
                            "pipeline)")

    def restore(self, path: Path, meta: dict[str, Any]) -> None:
        self.step = self.first_step = int(meta["step"])
        self.batches.load_state_dict(meta.get("data") or {**self.batches.state_dict(), "step": self.step})
        self.eval_pending = bool(meta.get("eval_pending", False))
        state = self.checkpointer.rank_state(path)
        if state is not None and meta.get("world_size") == self.env.world_size:
            rng.restore(state["rng"])
            how = "RNG restored"
        else:  # another world size: a fresh, reproducible stream per rank
            rng.reseed(self.cfg.seed, self.step, self.env.rank)
            how = f"RNG reseeded (written on {meta.get('world_size')} ranks, now {self.env.world_size})"
        if self.strategy.scaler is not None and state is not None and state.get("scaler"):
            self.strategy.scaler.load_state_dict(state["scaler"])
        if self.env.is_main:
            log.info("resumed from %s at step %d (%s samples seen; %s)", path, self.step,
                     f"{self.step * self.train.global_batch_size:,}", how)

    # --- agreeing across ranks ------------------------------------------------------------------------
    def sync(self) -> float:
        """The step's one small all_reduce: the straggler wait, the OR of the preemption flags, whether every
        rank's background checkpoint write is done, and rank 0's verdict on checkpoint.interval_minutes."""
        minutes_due = (self.env.is_main and self.interval_minutes is not None
                       and time.monotonic() - self.last_save_time >= 60 * self.interval_minutes)
        values = [1.0 if self.flag is not None and self.flag.raised else 0.0,
                  0.0 if self.checkpointer.poll_done() else 1.0, 1.0 if minutes_due else 0.0]
        seconds, (signalled, writing, due) = timed_flags(values)  # host values over gloo: no GPU sync
        if self.checkpointer.pending is not None and writing == 0:
            self.checkpointer.finish_async()
        if signalled and self.stop_signal is None:
            own = self.flag.signal_name if self.flag is not None else None
            self.stop_signal = own or "SIGNAL(another rank)"
        if due:
            self.save_due = True
        return seconds

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step; at log intervals also the metrics record of the window it closes."""
        t = self.train
        lr = lr_at(self.step, t.lr, t.min_lr, t.warmup_steps, t.decay_end)
        PROGRESS.phase("step", f"step {self.step}", self.step)
        self.faults.before_step(self.step, self.first_step)
        data_start = time.perf_counter()
        micro = [self.batches.get(self.step, m) for m in range(self.n_micro)]
        self.window.data_s += time.perf_counter() - data_start
        # A fast rank waits here for a slow one: that is communication time, not its own work.
        self.window.comm_s += self.sync()
        if self.stop_signal is not None:  # every rank stops before this step, and saves
            self.batches.step = self.step
            return None
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
        # a bar on a terminal; in a log file (a batch job, nohup) one line per log interval instead
        live = self.env.is_main and t.progress and sys.stderr.isatty()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not live, dynamic_ncols=True, desc="train")
        summary: dict[str, Any] = {}
        self.window = Window()
        if self.eval_pending and t.eval_interval:  # a signal interrupted it before the checkpoint: do it again
            self.run_eval(summary, bar)
        started = time.perf_counter()
        while self.step < t.max_steps and self.stop_signal is None:
            with self.spent.timed("train_s"):
                values = self.train_step()
            self.spent.steps += self.stop_signal is None
            if "first_step_s" not in self.startup:
                self.startup.update(first_step_s=time.perf_counter() - started, first_step_at=time.time())
            if self.stop_signal is not None:
                break
            bar.update(1)
            if values:
                summary.update(train_loss=values["loss"], tokens_per_s=values["tokens_per_s"])
                bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:,.0f}")
                if self.env.is_main and t.progress and not live:
                    log.info("step %d/%d: loss %.4f, %s tokens/s", self.step, t.max_steps, values["loss"],
                             f"{values['tokens_per_s']:,.0f}")
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.max_steps):
                if not self.run_eval(summary, bar):
                    break
            every = self.ckpt.interval_steps
            if self.exclusion is not None:  # saved below, like a preemption; the worker requeues without it
                self.stop_signal = "straggler"
            elif (every and self.step % every == 0) or self.save_due:
                self.save()
        bar.close()
        PROGRESS.phase("finish", "the final save", self.step)
        if self.exclusion is not None:
            summary["exclusion"] = self.exclusion.as_dict()
        elif self.stop_signal is not None:
            log.warning("preemption signal %s: every rank saves at step %d and stops", self.stop_signal, self.step)
        if self.stop_signal is not None:
            summary["preempted"] = self.stop_signal
        # Nothing trained yet (a signal before the first step): no checkpoint, the next attempt starts afresh as
        # this one did. A step-0 checkpoint would not resume exactly: DCP gives an optimizer without state a
        # step of its own, which shifts AdamW's bias correction.
        if self.step > 0 and (self.saved_step != self.step or self.eval_pending):
            self.save(allow_async=False)
        self.checkpointer.close()
        summary["first_step"], summary["last_step"] = self.first_step, self.step
        summary["spent"] = self.spent.as_dict()
        self.metrics.close()
        return summary

    def run_eval(self, summary: dict[str, Any], bar) -> bool:
        PROGRESS.phase("eval", f"evaluation at step {self.step}", self.step)
        with self.spent.timed("eval_s"):
            loss = self.evaluate()
        if loss is None:
            return False
        summary["val_loss"] = loss
        if self.env.is_main:
            bar.write(f"step {self.step}: val loss {loss:.4f}")
        self.window.start = time.perf_counter()  # evaluation time is not training time
        return True

    def checkpoint_interval(self) -> float | None:
        """checkpoint.interval_minutes, or for `auto` the interval that maximises expected goodput (Young/Daly),
        from the save cost measured in this run (its earlier attempts before its first save) and the
        interruptions its attempts log has seen (or a prior)."""
        if self.ckpt.interval_minutes != "auto":
            return self.ckpt.interval_minutes
        earlier = read_attempts(self.run_dir)
        saves = [(a["goodput"]["save_s"], a["goodput"].get("saves", 0)) for a in earlier if a.get("goodput")]
        seconds, count = self.spent.save_s + sum(s for s, _ in saves), self.spent.saves + sum(n for _, n in saves)
        cost, source = (seconds / count, "measured") if count else (PRIOR_SAVE_S, "a prior until the first save")
        mtbi, why = interruption_rate(earlier)
        minutes = young_daly_minutes(cost, mtbi)
        if self.env.is_main:
            log.info("checkpoint.interval_minutes=auto: every %.1f min (Young/Daly: a save costs %.2f s, %s; %s)",
                     minutes, cost, source, why)
        return minutes

    def check_warning_window(self) -> None:
        """A time-limit warning (cluster.signal_delay_s before the limit) must leave room for the step under
        way, a save and the requeue, with a margin; say so, with a value that would, when it does not."""
        have = OmegaConf.select(self.cfg, "cluster.signal_delay_s", default=None)
        if not self.env.is_main or have is None or not self.spent.steps:
            return
        need = window_needed(self.spent.train_s / self.spent.steps, self.spent.save_s / self.spent.saves)
        if need > have:
            log.warning("cluster.signal_delay_s=%s may be too short: a step (%.1f s), a save (%.1f s) and the requeue "
                        "need about %.0f s with a margin; set cluster.signal_delay_s=%d", have,
                        self.spent.train_s / self.spent.steps, self.spent.save_s / self.spent.saves, need,
                        math.ceil(need / 30) * 30)

    def save(self, allow_async: bool = True) -> Path:
        PROGRESS.phase("save", f"checkpoint save at step {self.step}", self.step)
        with self.spent.timed("save_s"):
            path = self.checkpointer.save(self.step, self.strategy, self.checkpoint_meta(), self.rank_state(),
                                          allow_async=allow_async)
        self.spent.saves += 1
        if self.spent.saves == 1:  # now a save's cost is measured here
            if self.ckpt.interval_minutes == "auto":
                self.interval_minutes = self.checkpoint_interval()
            self.check_warning_window()
        self.saved_step = self.step
        self.save_due = False
        self.last_save_time = time.monotonic()
        if self.checkpointer.pending is None:
            log.info("saved checkpoint %s (training blocked %.2f s)", path, self.checkpointer.last_blocked_s)
        else:
            log.info("saving checkpoint %s in the background (training blocked %.2f s)", path,
                     self.checkpointer.last_blocked_s)
        self.window.start += self.checkpointer.last_blocked_s  # saving is not training time
        return path
