"""The ModelConfig keys a Hugging Face config.json fixes, per family: GPT-2, LLaMA (Llama 1 to 3.3, SmolLM and
TinyLlama are LLaMA configs), Mistral, Qwen2/2.5 and Mixtral. A setting gptlaunch's model does not compute is refused
naming it. A value is the key's, or a tuple of values that compute the same; `max_block_size` is (limit, the
config.json key that sets it). Torch-free."""
from __future__ import annotations

from typing import Any

from gpt.errors import ConfigError
from gpt.hf.architecture import GPT2_ACTIVATIONS_IN

# config.json's defaults where a key is left out, as each transformers config class has them
LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_key_value_heads": None}
MISTRAL_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_key_value_heads": 8, "sliding_window": 4096}
QWEN2_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_key_value_heads": 32, "sliding_window": 4096}
MIXTRAL_DEFAULTS = {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_key_value_heads": 8, "num_local_experts": 8,
                    "num_experts_per_tok": 2}
FAMILIES = "a GPT-2, LLaMA, Mistral, Qwen2 or Mixtral folder"


def implied_model(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The ModelConfig keys config.json fixes; ConfigError for another family or a setting gptlaunch's model does
    not compute."""
    kind = config.get("model_type")
    if kind == "gpt2":
        return implied_gpt2(config, where)
    if kind == "llama":
        if config.get("attention_bias", False) != config.get("mlp_bias", False):
            raise ConfigError("init", where, "a LLaMA whose attention_bias and mlp_bias agree (one model.bias)")
        return {**implied_llama(config, where, "LLaMA", LLAMA_DEFAULTS), "n_expert": 0,
                "bias": config.get("attention_bias", False), "qkv_bias": False}
    if kind == "mistral":  # LLaMA's layers without biases, attending within a sliding window
        return {**implied_llama(config, where, "Mistral", MISTRAL_DEFAULTS), "n_expert": 0, "bias": False,
                "qkv_bias": False, **window(config.get("sliding_window", MISTRAL_DEFAULTS["sliding_window"]))}
    if kind == "qwen2":  # LLaMA's layers with biases on q, k and v only; a window only with use_sliding_window
        slides = config.get("use_sliding_window", False)
        return {**implied_llama(config, where, "Qwen2", QWEN2_DEFAULTS), "n_expert": 0, "bias": False,
                "qkv_bias": True,
                **window(config.get("sliding_window", QWEN2_DEFAULTS["sliding_window"]) if slides else None)}
    if kind == "mixtral":
        return {**implied_llama(config, where, "Mixtral", MIXTRAL_DEFAULTS), **implied_router(config, where),
                **window(config.get("sliding_window"))}
    raise ConfigError("init", where, f"{FAMILIES} (its config.json has model_type={kind})")


def window(sliding_window: int | None) -> dict[str, Any]:
    """gptlaunch attends over the whole block: the same as a sliding window only where the window covers it."""
    return {"max_block_size": (sliding_window, "sliding_window")} if sliding_window else {}


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
    """What the LLaMA-style families share: RoPE, RMSNorm, a SiLU-gated MLP, grouped-query attention."""
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
            "tie_embeddings": config.get("tie_word_embeddings", False), **implied_rope(config, where, name)}


def implied_rope(config: dict[str, Any], where: str, name: str) -> dict[str, Any]:
    """rope_scaling: none, or Llama 3.1's llama3 rule with its four numbers."""
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_scaling": "none"}
    if kind != "llama3":
        raise ConfigError("init", where, f"a {name} whose rope_scaling is none or llama3 (it has {scaling})")
    return {"rope_scaling": "llama3", "rope_factor": scaling["factor"],
            "rope_low_freq_factor": scaling["low_freq_factor"], "rope_high_freq_factor": scaling["high_freq_factor"],
            "rope_original_context": scaling["original_max_position_embeddings"]}


def implied_router(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Mixtral's experts and router. Its routing is gptlaunch's (softmax over all experts, top-k, renormalised)
    only without jitter."""
    if config.get("router_jitter_noise", 0.0):
        raise ConfigError("init", where, f"a Mixtral whose router_jitter_noise is 0 (it has "
                          f"{config['router_jitter_noise']}; gptlaunch's router adds no noise in training)")
    return {"n_expert": config.get("num_local_experts", MIXTRAL_DEFAULTS["num_local_experts"]),
            "moe_top_k": config.get("num_experts_per_tok", MIXTRAL_DEFAULTS["num_experts_per_tok"]),
            "bias": False, "qkv_bias": False}  # Mixtral's layers have no biases
