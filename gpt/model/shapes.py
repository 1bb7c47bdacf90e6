"""Every parameter of GPT(cfg) with its shape, in the order `GPT(cfg).named_parameters()` gives them (tied ones
once), from the config alone: torch-free, for the planner's memory estimate where a strategy places whole
parameters (gpt.parallel.traits: ZeRO-1's partition)."""
from __future__ import annotations

from gpt.config.model import ModelConfig

Shape = tuple[int, ...]


def _linear(name: str, n_in: int, n_out: int, bias: bool) -> list[tuple[str, Shape]]:
    return [(f"{name}.weight", (n_out, n_in))] + ([(f"{name}.bias", (n_out,))] if bias else [])


def _norm(name: str, cfg: ModelConfig) -> list[tuple[str, Shape]]:
    """RMSNorm has a weight; LayerNorm a bias too, unless the norm is the bias-free LayerNorm."""
    return [(f"{name}.weight", (cfg.n_embd,))] + ([(f"{name}.bias", (cfg.n_embd,))] if cfg.norm == "layernorm" else [])


def _mlp(name: str, cfg: ModelConfig) -> list[tuple[str, Shape]]:
    c, h = cfg.n_embd, cfg.mlp_hidden
    if cfg.mlp == "swiglu":
        return [*_linear(f"{name}.gate", c, h, cfg.bias), *_linear(f"{name}.up", c, h, cfg.bias),
                *_linear(f"{name}.down", h, c, cfg.bias)]
    return [*_linear(f"{name}.fc", c, h, cfg.bias), *_linear(f"{name}.proj", h, c, cfg.bias)]


def _layer(i: int, cfg: ModelConfig) -> list[tuple[str, Shape]]:
    p, c, kv = f"layers.{i}", cfg.n_embd, cfg.n_kv_head * cfg.head_dim
    qkv_bias = cfg.bias or cfg.qkv_bias
    attn = [*_linear(f"{p}.attn.q_proj", c, cfg.n_head * cfg.head_dim, qkv_bias),
            *_linear(f"{p}.attn.k_proj", c, kv, qkv_bias), *_linear(f"{p}.attn.v_proj", c, kv, qkv_bias),
            *_linear(f"{p}.attn.o_proj", cfg.n_head * cfg.head_dim, c, cfg.bias)]
    if cfg.n_expert:
        mlp = [*_linear(f"{p}.mlp.router", c, cfg.n_expert, False),
               *(s for e in range(cfg.n_expert) for s in _mlp(f"{p}.mlp.experts.{e}", cfg))]
    else:
        mlp = _mlp(f"{p}.mlp", cfg)
    return [*_norm(f"{p}.attn_norm", cfg), *attn, *_norm(f"{p}.mlp_norm", cfg), *mlp]


def parameter_shapes(cfg: ModelConfig) -> list[tuple[str, Shape]]:
    """(name, shape) of every parameter of GPT(cfg); cfg.vocab_size must be known."""
    out = [("wte.weight", (cfg.vocab_size, cfg.n_embd))]
    if cfg.position == "learned":
        out.append(("wpe.weight", (cfg.block_size, cfg.n_embd)))
    for i in range(cfg.n_layer):
        out += _layer(i, cfg)
    if cfg.norm_position == "pre":
        out += _norm("ln_f", cfg)
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", (cfg.vocab_size, cfg.n_embd)))
    return out
