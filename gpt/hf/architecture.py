"""Which stock `transformers` architecture a ModelConfig is, exactly, and the config that says so. A model with no
exact stock equivalent is refused naming what differs: an approximate export would give other logits.

GPT-2 style (learned positions, LayerNorm, GELU/ReLU/SiLU MLP) is GPT2LMHeadModel; LLaMA style (RoPE, RMSNorm,
SwiGLU) is LlamaForCausalLM, or Qwen2ForCausalLM with biases on q, k and v only (model.qkv_bias); its mixture of
experts is MixtralForCausalLM, whose router is the same (softmax over all experts, top-k, weights renormalised
over the k). Torch-free."""
from __future__ import annotations

from typing import Any

from gpt.config.model import ModelConfig
from gpt.errors import ConfigError

GPT2, LLAMA, MIXTRAL, QWEN2 = "GPT2LMHeadModel", "LlamaForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM"
# gptlaunch's MLP activation -> GPT2Config.activation_function (transformers' ACT2FN names of the same function)
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
# and back: gelu_new is the tanh approximation written out, as OpenAI's GPT-2 checkpoints name it
GPT2_ACTIVATIONS_IN = {**{v: k for k, v in GPT2_ACTIVATIONS.items()}, "gelu_new": "gelu_tanh"}


def architecture(cfg: ModelConfig) -> str:
    """The stock class that computes what `cfg` computes; ConfigError naming the first key with no equivalent."""
    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"model.{key}", getattr(cfg, key), f"{why}: no stock transformers architecture computes "
                           "this model exactly, so it is not exported")

    if cfg.norm_position != "pre":
        raise refuse("norm_position", "pre (GPT-2 and LLaMA normalise before each branch)")
    if cfg.position == "learned":
        if cfg.norm == "rmsnorm":
            raise refuse("norm", "layernorm or layernorm_nobias with learned positions (GPT-2)")
        if cfg.mlp not in GPT2_ACTIVATIONS:
            raise refuse("mlp", f"one of {', '.join(GPT2_ACTIVATIONS)} with learned positions (GPT-2)")
        if cfg.n_kv_head != cfg.n_head:
            raise refuse("n_query_groups", "null with learned positions (GPT-2 has multi-head attention only)")
        if cfg.n_expert:
            raise refuse("n_expert", "0 with learned positions (GPT-2 has no mixture of experts)")
        return GPT2
    if cfg.position != "rope":
        raise refuse("position", "learned (GPT-2) or rope (LLaMA)")
    if cfg.norm != "rmsnorm":
        raise refuse("norm", "rmsnorm with rope positions (LLaMA)")
    if cfg.mlp != "swiglu":
        raise refuse("mlp", "swiglu with rope positions (LLaMA)")
    if cfg.dropout:
        raise refuse("dropout", "0.0 with rope positions (LLaMA has attention dropout only, not gptlaunch's "
                     "embedding and residual dropout)")
    if cfg.n_expert and (cfg.bias or cfg.qkv_bias):
        raise refuse("bias" if cfg.bias else "qkv_bias", "false for a mixture of experts (Mixtral's layers have no "
                     "biases)")
    if cfg.n_expert:
        return MIXTRAL
    return QWEN2 if cfg.qkv_bias and not cfg.bias else LLAMA


def rope_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    """config.json's rope_scaling for `cfg`'s RoPE frequencies."""
    if cfg.rope_scaling == "none":
        return None
    return {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_context}


def hf_config(cfg: ModelConfig, eot: int | None, dtype: str = "float32") -> Any:
    """The transformers config of `cfg`'s architecture; `eot` the tokenizer's end of text (bos and eos) or None,
    `dtype` the weights' (float32 or bfloat16)."""
    import transformers

    arch = architecture(cfg)
    tokens = {"bos_token_id": eot, "eos_token_id": eot, "architectures": [arch],
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype}
    if arch == GPT2:
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.mlp_hidden, activation_function=GPT2_ACTIVATIONS[cfg.mlp],
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.norm_eps,
            initializer_range=cfg.init_std, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False, use_cache=True, **tokens)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                  head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.block_size,
                  rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base, rope_scaling=rope_scaling(cfg),
                  attention_dropout=0.0, initializer_range=cfg.init_std, use_cache=True, **tokens)
    if arch == MIXTRAL:
        return transformers.MixtralConfig(num_local_experts=cfg.n_expert, num_experts_per_tok=cfg.moe_top_k,
                                          router_aux_loss_coef=cfg.moe_aux_loss_weight, router_jitter_noise=0.0,
                                          sliding_window=None, **common)
    if arch == QWEN2:
        return transformers.Qwen2Config(use_sliding_window=False, **common)
    return transformers.LlamaConfig(attention_bias=cfg.bias, mlp_bias=cfg.bias, **common)
