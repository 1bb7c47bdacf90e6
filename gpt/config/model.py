"""The model's configuration and its validation. Hydra presets in configs/model/ fill this dataclass."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.config.parse import section
from gpt.errors import ConfigError

NORMS = ("layernorm", "layernorm_nobias", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("learned", "rope", "none")
ROPE_SCALINGS = ("none", "llama3")  # llama3: Llama 3.1's rule over the RoPE frequencies (the rope_* keys below)
MLPS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu")  # gelu_tanh: GELU's tanh approximation (OpenAI GPT-2)


@dataclass
class ModelConfig:
    name: str = "custom"
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int | None = None  # None: taken from the tokenizer when training starts
    n_query_groups: int | None = None  # None: multi-head (= n_head); 1: multi-query; else grouped-query
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    position: str = "learned"
    rope_base: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 8.0  # llama3: how much slower the low frequencies turn
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths over rope_original_context / this are slowed
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths under rope_original_context / this are kept
    rope_original_context: int = 8192  # llama3: the context the model was first trained at
    mlp: str = "gelu"
    mlp_ratio: float = 4.0  # hidden = mlp_ratio * n_embd; swiglu uses 2/3 of that, rounded up to mlp_multiple_of
    mlp_multiple_of: int = 64
    mlp_width: int | None = None  # the MLP's hidden width as a number (a folder's intermediate_size); None: mlp_ratio's
    bias: bool = True
    qkv_bias: bool = False  # q, k and v projections with a bias even where model.bias is false (Qwen2)
    dropout: float = 0.0
    n_expert: int = 0  # 0: dense MLP; >0: mixture of experts with top-k routing
    moe_top_k: int = 2
    moe_aux_loss_weight: float = 0.01
    tie_embeddings: bool = True
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self) -> int:
        return self.n_query_groups or self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_width:
            return self.mlp_width
        hidden = int(self.mlp_ratio * self.n_embd)
        if self.mlp == "swiglu":
            hidden = int(2 * hidden / 3)
            hidden = self.mlp_multiple_of * -(-hidden // self.mlp_multiple_of)
        return hidden

    def validate(self) -> None:
        def choice(key: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                raise ConfigError(f"model.{key}", value, f"one of {', '.join(options)}")

        def positive(key: str, value: int | None) -> None:
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{key}", value, "a positive integer")

        choice("norm", self.norm, NORMS)
        choice("norm_position", self.norm_position, NORM_POSITIONS)
        choice("position", self.position, POSITIONS)
        choice("mlp", self.mlp, MLPS)
        choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_scaling != "none" and self.position != "rope":
            raise ConfigError("model.rope_scaling", self.rope_scaling, "none with model.position=" + self.position)
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ConfigError("model.rope_high_freq_factor", self.rope_high_freq_factor,
                              f"above model.rope_low_freq_factor={self.rope_low_freq_factor} > 0")
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            positive(key, getattr(self, key))
        if self.vocab_size is not None:
            positive("vocab_size", self.vocab_size)
        if self.n_embd % self.n_head:
            raise ConfigError("model.n_embd", self.n_embd, f"a multiple of model.n_head={self.n_head}")
        if self.n_query_groups is not None:
            positive("n_query_groups", self.n_query_groups)
            if self.n_head % self.n_query_groups:
                raise ConfigError("model.n_query_groups", self.n_query_groups,
                                  f"a divisor of model.n_head={self.n_head}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError("model.position", "rope", f"needs an even head dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", self.dropout, "a float in [0, 1)")
        if self.n_expert < 0:
            raise ConfigError("model.n_expert", self.n_expert, "0 (dense) or a positive number of experts")
        if self.n_expert and not 1 <= self.moe_top_k <= self.n_expert:
            raise ConfigError("model.moe_top_k", self.moe_top_k, f"between 1 and model.n_expert={self.n_expert}")


MODEL_PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


def load_preset(name: str, configs_dir: Path | None = None) -> ModelConfig:
    """Build the ModelConfig of a preset in configs/model/ without Hydra, for tests and scripts.

    A preset's `defaults` list names sibling presets; they are merged first, in order, and the preset's own
    keys last (Hydra's order when `_self_` is not listed).
    """
    from omegaconf import OmegaConf

    configs_dir = Path(configs_dir) if configs_dir is not None else MODEL_PRESETS_DIR

    def load(preset: str) -> Any:
        path = configs_dir / f"{preset}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in configs_dir.glob("*.yaml"))
            raise ConfigError("model", preset, f"one of {', '.join(known)} (in {configs_dir})")
        node = OmegaConf.load(path)
        parents = [load(d) for d in node.pop("defaults", []) if d != "_self_"]
        return OmegaConf.merge(*parents, node)

    return section(ModelConfig, "model", OmegaConf.to_container(load(name), resolve=True))
