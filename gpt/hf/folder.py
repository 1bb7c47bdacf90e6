"""A local Hugging Face folder a run starts from (`init=hf:PATH`): checked against the run's model and tokenizer
before anything is submitted (torch-free, config.json only), and its weights read as data (safetensors, or the
older pytorch_model*.bin through torch.load(weights_only=True))."""
from __future__ import annotations

import dataclasses
import filecmp
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

from gpt.config.data import DataConfig
from gpt.config.model import ModelConfig
from gpt.errors import ConfigError, UserError

log = logging.getLogger(__name__)
PREFIX = "hf:"
TOKENIZER = "tokenizer.json"
SENTENCEPIECE = "tokenizer.model"  # LLaMA-2-style folders: converted by gpt/hf/sentencepiece.py
# the ModelConfig keys a folder's config.json fixes (mlp_hidden is said as model.mlp_width or model.mlp_ratio)
CHECKED = ("n_layer", "n_head", "n_embd", "n_query_groups", "position", "norm", "mlp", "mlp_hidden", "norm_eps",
           "rope_base", "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
           "rope_original_context", "bias", "qkv_bias", "n_expert", "moe_top_k", "norm_position", "tie_embeddings")
# the keys that set mlp_hidden
MLP_WIDTH = ("mlp_width", "mlp_ratio", "mlp_multiple_of")
# the keys filled from a folder (filled_model)
FILLED = tuple(k for k in CHECKED if k != "mlp_hidden") + ("vocab_size", "mlp_width")


VALID = "none, or hf:PATH with PATH a local Hugging Face folder (config.json, weights, tokenizer.json)"


def folder_of(init: str) -> Path | None:
    """The folder `init` names, None for init=none; ConfigError for anything else (no file is read)."""
    if init == "none":
        return None
    if not init.startswith(PREFIX) or not init[len(PREFIX):]:
        raise ConfigError("init", init, VALID)
    return Path(init[len(PREFIX):])


def check_init_choice(init: str, resume: str) -> None:
    """init's form, and one place to start from: what every read of a run's config checks (no file is read)."""
    if folder_of(init) is not None and resume not in ("auto", "none"):
        raise ConfigError("resume", resume, f"auto or none with init={init}: a run is initialised from one place")


def check_init(init: str, model: ModelConfig, data: DataConfig, resume: str) -> None:
    """At planning, while the run has no checkpoint of its own: the folder's architecture, shapes and vocabulary
    against model.*, and its tokenizer against data.*: the first key that differs, in one line."""
    check_init_choice(init, resume)
    folder = folder_of(init)
    if folder is None:
        return
    implied = implied_by(folder)
    where = f"as {folder / 'config.json'} has it"
    if model.vocab_size != implied["vocab_size"]:
        raise ConfigError("model.vocab_size", model.vocab_size, f"{implied['vocab_size']}, {where}")
    for key in CHECKED:
        wanted = implied.get(key, getattr(model, key))
        if getattr(model, key) not in (wanted if isinstance(wanted, tuple) else (wanted,)):
            shown = f"model.{mlp_key(model) if key == 'mlp_hidden' else key}"
            value = getattr(model, mlp_key(model) if key == "mlp_hidden" else key)
            if key == "mlp_hidden" and not model.mlp_width:
                wanted = f"{wanted / model.n_embd:g} (hidden {wanted})"
            elif isinstance(wanted, tuple):
                wanted = " or ".join(wanted)
            raise ConfigError(shown, value, f"{wanted}, {where}")
    limit, key = implied.get("max_block_size", (model.block_size, ""))
    if model.block_size > limit:  # GPT-2's positions, a sliding attention window
        raise ConfigError("model.block_size", model.block_size, f"at most {key}={limit}, {where}")
    check_tokenizer(folder, data)


def implied_by(folder: Path) -> dict[str, Any]:
    """The model.* keys the folder's config.json fixes (gpt.hf.implied)."""
    from gpt.hf.implied import implied_model

    if not (folder / "config.json").is_file():
        raise ConfigError("init", f"{PREFIX}{folder}", VALID)
    return implied_model(json.loads((folder / "config.json").read_text()), str(folder))


def mlp_key(model: ModelConfig) -> str:
    return "mlp_width" if model.mlp_width else "mlp_ratio"


def filled_model(init: str, model: ModelConfig, given: set[str]) -> ModelConfig:
    """`model` with every key the folder `init` names fixes taken from its config.json, but those in `given` (the
    command's own), which check_init then checks against it. No folder: `model` as it is."""
    folder = folder_of(init)
    if folder is None:
        return model
    filled = {}
    for key, value in implied_by(folder).items():
        if key == "mlp_hidden":
            if not given & set(MLP_WIDTH):
                filled["mlp_width"] = value
        elif key in given or key == "max_block_size":
            continue
        elif not isinstance(value, tuple):
            filled[key] = value
        elif getattr(model, key) not in value:  # of values that compute the same, the first
            filled[key] = value[0]
    return dataclasses.replace(model, **filled)


def check_tokenizer(folder: Path, data: DataConfig) -> None:
    """data.tokenizer_file must be the folder's tokenizer.json, or without one its SentencePiece tokenizer.model."""
    theirs = folder / TOKENIZER if (folder / TOKENIZER).is_file() else folder / SENTENCEPIECE
    if not theirs.is_file():
        raise UserError(f"init=hf:{folder} has no {TOKENIZER} or {SENTENCEPIECE}")
    if data.tokenizer != "hf" or not data.tokenizer_file or not filecmp.cmp(data.tokenizer_file, theirs, shallow=False):
        raise ConfigError("data.tokenizer_file", data.tokenizer_file, f"{theirs} with data.tokenizer=hf: the "
                          "tokenizer of the folder the run starts from")


def read_weights(folder: Path) -> dict[str, Any]:
    """Every tensor of the folder's weight files, by name, read as data."""
    import torch
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"init=hf:{folder} holds no weights (*.safetensors or pytorch_model*.bin)")
    weights = {}
    for f in files:
        try:
            weights.update(torch.load(f, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as e:  # what weights_only refuses: code or objects other than tensors
            found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed global.*)?$", str(e), re.M)
            what = found[1] if found else str(e).splitlines()[0]  # one line of torch's several
            raise UserError(f"init=hf:{folder}: {f.name} holds more than tensors ({what}) and is "
                            "not loaded: .bin files are read as tensors only; convert it to safetensors where its "
                            "source is trusted") from None
    return weights


def load_into(model: Any, init: str) -> None:
    """Initialise `model` (a GPT, before any layout wraps it) from the folder `init` names."""
    from gpt.hf.weights import from_hf

    folder = folder_of(init)
    assert folder is not None
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(from_hf(read_weights(folder), model.cfg, shapes, str(folder)))
    log.info("weights from init=hf:%s (%d tensors, %.1fM parameters): training starts from them", folder,
             len(shapes), sum(p.numel() for p in model.parameters()) / 1e6)
