"""gptlaunch's parameter names and layouts against the stock architectures'. GPT-2's attention is one fused qkv
projection and its linear layers are Conv1D (weight stored as (in, out)); LLaMA's and Mixtral's are nn.Linear under
other names. A bias gptlaunch's model does not have (model.bias=false, layernorm_nobias) is GPT-2's zero bias: the
same function, exactly."""
from __future__ import annotations

import torch
from torch import Tensor

from gpt.config.model import ModelConfig
from gpt.errors import UserError
from gpt.hf.architecture import GPT2, MIXTRAL, architecture

Names = list[tuple[str, str, bool]]  # (gptlaunch name, transformers name, transposed)

GPT2_LAYER = (("attn_norm", "ln_1", False), ("mlp_norm", "ln_2", False), ("attn.o_proj", "attn.c_proj", True),
              ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True))
LLAMA_LAYER = (("attn_norm", "input_layernorm", False), ("mlp_norm", "post_attention_layernorm", False),
               *((f"attn.{p}_proj", f"self_attn.{p}_proj", False) for p in "qkvo"),
               ("mlp.gate", "mlp.gate_proj", False), ("mlp.up", "mlp.up_proj", False),
               ("mlp.down", "mlp.down_proj", False))
MIXTRAL_EXPERT = (("gate", "w1"), ("down", "w2"), ("up", "w3"))
QKV = ("q_proj", "k_proj", "v_proj")


def module_names(cfg: ModelConfig) -> Names:
    """Every module of gptlaunch's model with its transformers name (GPT-2's fused qkv aside)."""
    arch = architecture(cfg)
    if arch == GPT2:
        top = [("wte", "transformer.wte", False), ("wpe", "transformer.wpe", False),
               ("ln_f", "transformer.ln_f", False)]
        layer, prefix = list(GPT2_LAYER), "transformer.h"
    else:
        top = [("wte", "model.embed_tokens", False), ("ln_f", "model.norm", False)]
        layer, prefix = list(LLAMA_LAYER), "model.layers"
    if arch == MIXTRAL:
        layer = layer[:-3] + [("mlp.router", "block_sparse_moe.gate", False)] + [
            (f"mlp.experts.{e}.{ours}", f"block_sparse_moe.experts.{e}.{theirs}", False)
            for e in range(cfg.n_expert) for ours, theirs in MIXTRAL_EXPERT]
    names = top + [("lm_head", "lm_head", False)]
    for i in range(cfg.n_layer):
        names += [(f"layers.{i}.{ours}", f"{prefix}.{i}.{theirs}", t) for ours, theirs, t in layer]
    return names


def to_hf(state: dict[str, Tensor], cfg: ModelConfig, shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """gptlaunch's state dict as the transformers model's, whose keys and shapes are `shapes`; a key gptlaunch's
    model has no tensor for is a bias, written as zeros."""
    out = {}
    for ours, theirs, transposed in module_names(cfg):
        for p in ("weight", "bias"):
            if f"{ours}.{p}" in state:
                t = state[f"{ours}.{p}"]
                out[f"{theirs}.{p}"] = t.t() if transposed and p == "weight" else t
    if architecture(cfg) == GPT2:
        for i in range(cfg.n_layer):
            for p in ("weight", "bias"):
                parts = [state.get(f"layers.{i}.attn.{q}.{p}") for q in QKV]
                if parts[0] is not None:
                    fused = torch.cat(parts, dim=0)
                    out[f"transformer.h.{i}.attn.c_attn.{p}"] = fused.t() if p == "weight" else fused
    for key, shape in shapes.items():
        if key not in out:
            if not key.endswith(".bias"):
                raise AssertionError(f"no gptlaunch tensor maps to {key}")
            out[key] = torch.zeros(shape)
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(hf: dict[str, Tensor], cfg: ModelConfig, shapes: dict[str, torch.Size], where: str) -> dict[str, Tensor]:
    """A transformers state dict as gptlaunch's model's (keys and shapes `shapes`). A tensor the model has no place
    for must be a zero bias; a shape that differs is refused naming the tensor."""
    hf = dict(hf)
    if architecture(cfg) == GPT2:
        for i in range(cfg.n_layer):
            for p in ("weight", "bias"):
                fused = hf.pop(f"transformer.h.{i}.attn.c_attn.{p}", None)
                if fused is not None:
                    fused = fused.t() if p == "weight" else fused
                    for q, part in zip(QKV, fused.chunk(3, dim=0)):
                        hf[f"transformer.h.{i}.attn.{q}.{p}"] = part.t() if p == "weight" else part
        names = module_names(cfg) + [(f"layers.{i}.attn.{q}", f"transformer.h.{i}.attn.{q}", True)
                                     for i in range(cfg.n_layer) for q in QKV]
    else:
        names = module_names(cfg)
    if cfg.tie_embeddings and "lm_head.weight" not in hf:
        hf["lm_head.weight"] = hf[next(t for o, t, _ in names if o == "wte") + ".weight"]
    out = {}
    for ours, theirs, transposed in names:
        for p in ("weight", "bias"):
            t = hf.pop(f"{theirs}.{p}", None)
            if f"{ours}.{p}" in shapes:
                if t is None:
                    raise UserError(f"init=hf:{where} has no tensor {theirs}.{p}, which model.{ours}.{p} needs")
                out[f"{ours}.{p}"] = t.t() if transposed and p == "weight" else t
            elif t is not None and t.count_nonzero():
                raise UserError(f"init=hf:{where}: {theirs}.{p} is not zero and this model has no such bias "
                                "(model.bias=false or norm=layernorm_nobias); use model.bias=true, norm=layernorm")
    if cfg.position == "learned" and "wpe.weight" in out:  # a shorter block_size uses the first positions
        out["wpe.weight"] = out["wpe.weight"][:cfg.block_size]
    for key, shape in shapes.items():
        if out[key].shape != shape:
            raise UserError(f"init=hf:{where}: {key} has shape {tuple(out[key].shape)} there and "
                            f"{tuple(shape)} in this run's model; make model.* match the folder's config.json")
    return {k: v.contiguous() for k, v in out.items()}
