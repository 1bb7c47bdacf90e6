"""The weights of a DeepSpeed checkpoint, read in one process from the engine's own files (`deepspeed/engine/`).

A DeepSpeed run writes its fp32 weights whole, as the DCP `model` entry, at its last save alone
(gpt.parallel.deepspeed): gathering them onto rank 0 at every save would cost rank 0 4 bytes of host memory per
parameter, written by one thread inside a preemption's grace time. Every other checkpoint's weights are put
together here, by the one process that reads them (export, evaluation, generation), from the fp32 partitions every
rank wrote: DeepSpeed's own zero_to_fp32 for ZeRO-1..3, the module the engine saved whole for ZeRO-0.
"""
from __future__ import annotations

import contextlib
import io
import importlib.util
from pathlib import Path

import torch

from gpt.checkpoint.safe_load import deepspeed_files_as_data, load_deepspeed_file, saved_keys
from gpt.errors import UserError

FOLDER, TAG = "deepspeed", "engine"  # the engine's checkpoint: FOLDER/TAG/ in a checkpoint folder


def needs_engine(path: Path) -> bool:
    """Whether the checkpoint at `path` holds its weights in DeepSpeed's engine files alone (no DCP `model` entry)."""
    return (path / FOLDER / TAG).is_dir() and not any(k.startswith("model.") for k in saved_keys(path))


def engine_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's fp32 weights by state-dict name, from the engine files of the checkpoint at `path`."""
    folder = path / FOLDER / TAG
    if not any(folder.glob("*_optim_states.pt")):  # ZeRO-0: no partitions, the module saved whole
        module = load_deepspeed_file(next(folder.glob("*model_states.pt")), map_location="cpu")["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"checkpoint {path} holds its weights in DeepSpeed's ZeRO partitions, which DeepSpeed reads: "
                        "`pip install deepspeed` (a DeepSpeed run's final checkpoint holds them whole)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with deepspeed_files_as_data(folder), contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        return get_fp32_state_dict_from_zero_checkpoint(str(path / FOLDER), tag=TAG)
