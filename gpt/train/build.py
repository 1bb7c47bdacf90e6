"""A rank's model and strategy: the model config (the vocabulary from the prepared data), the model built on this
rank's device, wrapped by the strategy with its optimizer."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from gpt.config.model import ModelConfig
from gpt.config.schema import RunConfig
from gpt.data import check_vocab
from gpt.train import rng
from gpt.collectives.process_group import DistEnv
from gpt.hf.folder import load_into
from gpt.model import attention
from gpt.model.transformer import GPT
from gpt.parallel import build_strategy
from gpt.parallel.base import DTYPES, Compile, Strategy
from gpt.train.metrics import layer_keys


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
                             model_device: torch.device | None = None) -> Strategy:
    """The run's strategy (its strategy and parallel sections), wrapping a model built on this rank's device (or on
    `model_device`: the meta device of a dry run, gpt.train.dry_build), and its optimizer (the train section)."""
    train = run.train
    use_tf32(device, train.precision)
    strategy = build_strategy(run.strategy, run.parallel, model_cfg, env, device, train.precision)
    # before the model: a kernel that cannot run refuses in one line, not at the first step
    strategy.attention_kernel = attention.check(model_cfg, train.attention, device, DTYPES[train.precision])
    model = build_model(model_cfg, model_device or device, run.seed)
    if run.init != "none":  # before the layout wraps it; a run's own checkpoint, if any, replaces these weights
        load_into(model, run.init)
    every = train.recompute_every()
    kernels = attention.backends(train.attention)
    for i, block in enumerate(model.layers.values()):
        block.recompute = every > 0 and i % every == 0
        block.attn.kernels = kernels
    strategy.layer_keys = layer_keys(name for name, _ in model.named_parameters())
    if train.compile:
        strategy.compile = Compile(strategy.traits().compile_scope(train), train.compile_mode)
    strategy.setup(model, train.lr, train.weight_decay, tuple(train.betas))
    rng.seed_device(run.seed, rng.stream_index(env.rank, strategy.dims.tp), device)
    return strategy
