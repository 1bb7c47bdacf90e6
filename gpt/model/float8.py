"""train.precision=fp8: torchao's float8 training. The model's linear layers large enough to gain become torchao's
Float8Linear (matmuls in float8 with dynamic scales, tensorwise or rowwise: train.fp8_recipe) after the model is
built and before torch.compile and the data-parallel wrapper, as torchao documents; every other layer runs bf16.

Which layers: torchao's own thresholds, measured on an H100 (torchao.float8.float8_linear_utils' auto filters,
torchao 0.18): both dimensions multiples of 16 (float8 matmuls need it), and large enough that the casts cost less
than the matmul gains. The output head (tied to the embedding in most presets) and the embeddings stay bf16, as
torchao and TorchTitan leave the output layer. The decision is torch-free, from a layer's name and weight shape, so
the planner and the tests name the converted layers from the config alone (float8_layers)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from gpt.config.model import ModelConfig
from gpt.errors import ConfigError
from gpt.model.shapes import parameter_shapes

if TYPE_CHECKING:
    import torch
    from torch import nn

# Kept in bf16 whatever their shapes: the embeddings, and the output head torchao recommends leaving out
KEPT = ("wte", "wpe", "lm_head")
# Float8 matmuls need a compute capability of 8.9 or more (Ada, Hopper, Blackwell)
MIN_CAPABILITY = (8, 9)


def gains(name: str, out_features: int, in_features: int, recipe: str) -> bool:
    """Whether the linear layer `name`, of weight (out_features, in_features), is converted to float8 under
    `recipe`. Below torchao's thresholds the casts cost more than the float8 matmul saves."""
    if name.rsplit(".", 1)[-1] in KEPT or out_features % 16 or in_features % 16:
        return False
    n, k = out_features, in_features
    if recipe == "tensorwise":
        return not (k <= 4096 and n <= 1024)
    return not (n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048))  # rowwise


def float8_layers(cfg: ModelConfig, recipe: str) -> list[str]:
    """The linear layers of GPT(cfg) that float8 training converts, by name, from the config alone."""
    layers = [(name.removesuffix(".weight"), shape) for name, shape in parameter_shapes(cfg)
              if name.endswith(".weight") and len(shape) == 2]
    return [name for name, (n, k) in layers if gains(name, n, k, recipe)]


def check_device(device: torch.device) -> None:
    """Refuse, in the rank before the model is built, a device without float8 matmuls: a CPU, or a GPU of compute
    capability below 8.9 (an A100 is 8.0). Planning refuses a CPU run already; only the rank sees its GPU."""
    import torch

    if device.type != "cuda":
        raise ConfigError("train.precision", "fp8", f"bf16 on {device.type} (float8 matmuls need an NVIDIA GPU of "
                          "compute capability 8.9 or more: L4, L40, H100, H200, B200)")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError("train.precision", "fp8", f"bf16 on this {torch.cuda.get_device_name(device)} (compute "
                          f"capability {capability[0]}.{capability[1]}; float8 matmuls need 8.9 or more: L4, L40, "
                          "H100, H200, B200)")


def convert(model: nn.Module, recipe: str, all_gather: bool = False) -> list[str]:
    """Swap `model`'s linear layers that gain (gains) for torchao's Float8Linear, in place; their names. Before
    compile and before the strategy wraps the model: FSDP2 and DDP then take Float8Linear as any nn.Linear.
    `all_gather`: their weights become torchao's float8-castable tensors, which FSDP2 all-gathers in float8."""
    import dataclasses

    from torch import nn
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    converted: list[str] = []

    def keep(module: nn.Module, name: str) -> bool:
        chosen = isinstance(module, nn.Linear) and gains(name, *module.weight.shape, recipe)
        if chosen:
            converted.append(name)
        return chosen

    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), enable_fsdp_float8_all_gather=all_gather)
    convert_to_float8_training(model, module_filter_fn=keep, config=config)
    return converted
