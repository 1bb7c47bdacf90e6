"""A rank's model, strategy and data: the model config (the vocabulary from the prepared data), the model built on
this rank's device, wrapped by the strategy with its optimizer, and the rank's share of every batch."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from gpt.config.model import ModelConfig
from gpt.config.schema import RunConfig
from gpt.data import check_vocab
from gpt.data.loader import Prefetcher, TokenDataset, TrainBatches, ValBatches
from gpt.data.tokenizer import load_tokenizer
from gpt.eval.multiple_choice import TaskScorer
from gpt.train import rng
from gpt.collectives.process_group import DistEnv
from gpt.hf.folder import load_into
from gpt.model import attention, float8
from gpt.model.transformer import GPT
from gpt.parallel import build_strategy
from gpt.parallel.base import DTYPES, Compile, Strategy, StrategySettings, no_wait
from gpt.parallel.traits import traits_of
from gpt.train.metrics import layer_keys

log = logging.getLogger(__name__)


def model_config(model: ModelConfig, data_dir: Path) -> ModelConfig:
    """The model's config with the vocabulary filled in from the prepared data's tokenizer when unset."""
    vocab = check_vocab(model.vocab_size, data_dir)
    return dataclasses.replace(model, vocab_size=model.vocab_size or vocab)


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


def build_strategy_and_model(run: RunConfig, model_cfg: ModelConfig, env: DistEnv, device: torch.device,
                             initialise: bool = True, before_update: Callable[[], None] = no_wait,
                             model_device: torch.device | None = None, phases: dict | None = None) -> Strategy:
    """The run's strategy (its strategy and parallel sections), wrapping a model built on this rank's device (or on
    `model_device`: the meta device of a dry run, gpt.train.dry_build), and its optimizer (the train section).
    `initialise`: load init=hf:PATH's weights (not when the run continues from a checkpoint of its own, whose
    weights replace them: the folder is not read again, and may be gone). `before_update`: what the strategy calls
    before each update changes a weight. `phases`: where the seconds went, filled in (MODEL_PARTS)."""
    train, clock = run.train, time.perf_counter()
    use_tf32(device, train.precision)
    if train.precision == "fp8" and model_device is None:  # a dry run's meta model has no device to ask
        float8.check_device(device)
    # before the model: a kernel that cannot run refuses in one line, not at the first step
    kernel = attention.check(model_cfg, train.attention, device, DTYPES[train.compute_precision])
    kernel_s, clock = time.perf_counter() - clock, time.perf_counter()
    model = build_model(model_cfg, model_device or device, run.seed)
    if run.init != "none" and initialise:  # before the layout wraps it
        load_into(model, run.init)
    elif run.init != "none":
        log.info("init=%s is not read: this run continues from its own checkpoints", run.init)
    model.residual_dtype = DTYPES[train.residual_dtype] if train.residual_dtype != "fp32" else None
    every = train.recompute_every()
    kernels = attention.backends(train.attention)
    for i, block in enumerate(model.layers.values()):
        block.recompute = every > 0 and i % every == 0
        block.attn.kernels = kernels
        block.attn.fused_qkv = train.fused_qkv
    if train.precision == "fp8":  # after the weights, before compile and the data-parallel wrapper
        converted = float8.convert(model, train.fp8_recipe, train.fp8_all_gather)
        log.info("fp8 (%s scaling): %d linear layers in float8, the rest bf16", train.fp8_recipe, len(converted))
    # the strategy after the model: its settings name the model's layers (per-layer gradient norms)
    compiled = Compile(traits_of(run.strategy.name).compile_scope(train), train.compile_mode) if train.compile else None
    settings = StrategySettings(kernel, compiled, tuple(layer_keys(name for name, _ in model.named_parameters())),
                                before_update, train.reduce_dtype, train.fp8_all_gather)
    strategy = build_strategy(run.strategy, run.parallel, model_cfg, env, device, train.compute_precision, settings)
    build_s, clock = time.perf_counter() - clock, time.perf_counter()
    strategy.setup(model, train.lr, train.weight_decay, tuple(train.betas))
    if phases is not None:
        phases.update(kernel_check_s=kernel_s, build_s=build_s, setup_s=time.perf_counter() - clock)
    rng.seed_device(run.seed, rng.stream_index(env.rank, strategy.dims.tp), device)
    return strategy


@dataclass(frozen=True)
class RankData:
    """This rank's share of every batch: training (read ahead of the step), validation, downstream tasks."""

    batches: TrainBatches
    prefetch: Prefetcher
    val: ValBatches
    tasks: TaskScorer | None  # eval.tasks, if any
    micro_batch: int  # samples per micro-step on this rank
    n_micro: int  # micro-steps per step


def open_data(run: RunConfig, model_cfg: ModelConfig, strategy: Strategy, device: torch.device) -> RankData:
    """The rank's data, split over the strategy's data-parallel replicas."""
    train, data_dir = run.train, Path(run.data.dir)
    micro_batch, n_micro = train.micro_batches(strategy.dp_size)
    block, dp_rank, dp_size = model_cfg.block_size, strategy.dp_rank, strategy.dp_size
    batches = TrainBatches(TokenDataset(data_dir, "train"), run.seed, block, train.global_batch_size, micro_batch,
                           dp_rank, dp_size, device)
    # the run's validation set is eval_batches global batches: what the micro-batch size and the data-parallel size
    # change is how it is split into forward passes, never which samples it holds
    val = ValBatches(TokenDataset(data_dir, "val"), run.seed, block, train.global_batch_size, train.eval_batches,
                     dp_rank, dp_size, device, micro_batch)
    prefetch = Prefetcher(batches)
    tasks = TaskScorer(run.eval.tasks, run.eval.limit, load_tokenizer(data_dir), block) if run.eval.tasks else None
    return RankData(batches, prefetch, val, tasks, micro_batch, n_micro)
