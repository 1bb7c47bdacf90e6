"""Which stock `transformers` architecture a ModelConfig is, exactly, and the config that says so. A model with no
exact stock equivalent is refused naming what differs: an approximate export would give other logits.

GPT-2 style (learned positions, LayerNorm, GELU/ReLU/SiLU MLP) is GPT2LMHeadModel; LLaMA style (RoPE, RMSNorm,
SwiGLU) is LlamaForCausalLM; its mixture of experts is MixtralForCausalLM, whose router is the same (softmax over
all experts, top-k, weights renormalised over the k). Torch-free."""
from __future__ import annotations

from typing import Any

from gpt.config.model import ModelConfig
from gpt.errors import ConfigError

GPT2, LLAMA, MIXTRAL = "GPT2LMHeadModel", "LlamaForCausalLM", "MixtralForCausalLM"
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
    if cfg.n_expert and cfg.bias:
        raise refuse("bias", "false for a mixture of experts (Mixtral's layers have no biases)")
    return MIXTRAL if cfg.n_expert else LLAMA


def hf_config(cfg: ModelConfig, eot: int | None) -> Any:
    """The transformers config of `cfg`'s architecture; `eot` the tokenizer's end of text (bos and eos) or None."""
    import transformers

    arch = architecture(cfg)
    tokens = {"bos_token_id": eot, "eos_token_id": eot, "architectures": [arch],
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}
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
                  rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base, rope_scaling=None, attention_dropout=0.0,
                  initializer_range=cfg.init_std, use_cache=True, **tokens)
    if arch == MIXTRAL:
        return transformers.MixtralConfig(num_local_experts=cfg.n_expert, num_experts_per_tok=cfg.moe_top_k,
                                          router_aux_loss_coef=cfg.moe_aux_loss_weight, router_jitter_noise=0.0,
                                          sliding_window=None, **common)
    return transformers.LlamaConfig(attention_bias=cfg.bias, mlp_bias=cfg.bias, **common)


# config.json's defaults where a key is left out, as each transformers config class has them
LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_key_value_heads": None}
MIXTRAL_DEFAULTS = {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_key_value_heads": 8, "num_local_experts": 8,
                    "num_experts_per_tok": 2}


def implied_model(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The ModelConfig keys a Hugging Face config.json (GPT-2, LLaMA or Mixtral) fixes; ConfigError for another
    architecture or a setting gptlaunch's model does not compute."""
    kind = config.get("model_type")
    if kind == "gpt2":
        return implied_gpt2(config, where)
    if kind == "llama":
        if config.get("attention_bias", False) != config.get("mlp_bias", False):
            raise ConfigError("init", where, "a LLaMA whose attention_bias and mlp_bias agree (one model.bias)")
        return {**implied_llama(config, where, "LLaMA", LLAMA_DEFAULTS), "n_expert": 0,
                "bias": config.get("attention_bias", False)}
    if kind == "mixtral":
        return {**implied_llama(config, where, "Mixtral", MIXTRAL_DEFAULTS), **implied_router(config, where)}
    raise ConfigError("init", where, f"a GPT-2, LLaMA or Mixtral folder (its config.json has model_type={kind})")


def implied_gpt2(config: dict[str, Any], where: str) -> dict[str, Any]:
    act = config.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS_IN:
        raise ConfigError("init", where, f"a GPT-2 whose activation_function is one of "
                          f"{', '.join(GPT2_ACTIVATIONS_IN)}, not {act}")
    if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("init", where, "a GPT-2 whose attention is scaled by 1/sqrt(head_dim) only")
    return {"n_layer": config["n_layer"], "n_head": config["n_head"], "n_embd": config["n_embd"],
            "vocab_size": config["vocab_size"], "n_query_groups": None, "position": "learned", "n_expert": 0,
            "norm": ("layernorm", "layernorm_nobias"),  # a zero bias is no bias: checked with the weights
            "mlp": GPT2_ACTIVATIONS_IN[act], "mlp_hidden": config.get("n_inner") or 4 * config["n_embd"],
            "norm_eps": config.get("layer_norm_epsilon", 1e-5), "norm_position": "pre",
            "max_block_size": (config["n_positions"], "n_positions"),
            "tie_embeddings": config.get("tie_word_embeddings", True)}


def implied_llama(config: dict[str, Any], where: str, name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """What LLaMA and Mixtral share: RoPE, RMSNorm, a SiLU-gated MLP, grouped-query attention."""
    if config.get("rope_scaling"):
        raise ConfigError("init", where, f"a {name} without rope_scaling (it has {config['rope_scaling']})")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError("init", where, f"a {name} whose hidden_act is silu (SwiGLU), not {config['hidden_act']}")
    heads, width = config["num_attention_heads"], config["hidden_size"]
    if (config.get("head_dim") or width // heads) != width // heads:
        raise ConfigError("init", where, f"a {name} whose head_dim is hidden_size / heads = {width // heads}")
    kv = config.get("num_key_value_heads", defaults["num_key_value_heads"]) or heads
    return {"n_layer": config["num_hidden_layers"], "n_head": heads, "n_embd": width,
            "vocab_size": config["vocab_size"], "n_query_groups": None if kv == heads else kv,
            "position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "mlp_hidden": config["intermediate_size"],
            "norm_eps": config.get("rms_norm_eps", defaults["rms_norm_eps"]),
            "rope_base": config.get("rope_theta", defaults["rope_theta"]), "norm_position": "pre",
            "tie_embeddings": config.get("tie_word_embeddings", False)}


def implied_router(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Mixtral's experts and router. Its routing is gptlaunch's (softmax over all experts, top-k, renormalised)
    only without jitter, and its attention is causal over the whole block only where the window covers it."""
    if config.get("router_jitter_noise", 0.0):
        raise ConfigError("init", where, f"a Mixtral whose router_jitter_noise is 0 (it has "
                          f"{config['router_jitter_noise']}; gptlaunch's router adds no noise in training)")
    implied = {"n_expert": config.get("num_local_experts", MIXTRAL_DEFAULTS["num_local_experts"]),
               "moe_top_k": config.get("num_experts_per_tok", MIXTRAL_DEFAULTS["num_experts_per_tok"]),
               "bias": False}  # Mixtral's layers have no biases
    if config.get("sliding_window"):
        implied["max_block_size"] = (config["sliding_window"], "sliding_window")
    return implied
