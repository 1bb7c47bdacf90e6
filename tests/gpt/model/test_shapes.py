"""gpt.model.shapes lists GPT's parameters from the config alone (the planner's estimate reads it, torch-free): the
names and shapes GPT(cfg) has, in its order, for every preset and every norm, bias and tying choice."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gpt.config.model import MODEL_PRESETS_DIR, load_preset
from gpt.model.shapes import parameter_shapes
from gpt.model.transformer import GPT
from helpers import spread

VARIANTS = [{}, {"norm": "layernorm", "bias": True, "tie_embeddings": False}, {"norm": "layernorm_nobias"},
            {"norm_position": "post", "position": "learned"}, {"bias": False, "qkv_bias": True}]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", spread("name", sorted(p.stem for p in MODEL_PRESETS_DIR.glob("*.yaml")), 4))
def test_the_shapes_are_those_of_the_model(name, variant):
    preset = load_preset(name)
    cfg = dataclasses.replace(preset, vocab_size=preset.vocab_size or 50304, **variant)
    with torch.device("meta"):  # shapes without memory: gpt2_1.5b included
        model = GPT(cfg)
    assert parameter_shapes(cfg) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
