"""Export to Hugging Face: each preset family loads in transformers with from_pretrained (no custom code) and gives
gptlaunch's logits and greedy tokens; a model with no exact stock equivalent is refused naming the key; the
tokenizer encodes as training did. The models are built from their configs: nothing is downloaded."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import SHAKESPEARE  # noqa: E402
from gpt.config.model import load_preset  # noqa: E402
from gpt.data.tokenizer import BPETokenizer, CharTokenizer  # noqa: E402
from gpt.errors import ConfigError  # noqa: E402
from gpt.export import hf_model  # noqa: E402
from gpt.hf.tokenizer import fast_tokenizer  # noqa: E402
from gpt.model.transformer import GPT  # noqa: E402

SMALL = dict(n_layer=2, n_head=4, n_embd=64, block_size=48, vocab_size=101)
FAMILIES = {  # preset, changes: every family of configs/model/ and the variants that export differently
    "gpt2": ("tiny", {}),
    "gpt2_nobias": ("shakespeare_cpu", {"dropout": 0.1}),
    "gpt2_untied_gelu_tanh": ("tiny", {"tie_embeddings": False, "mlp": "gelu_tanh", "mlp_ratio": 3.0}),
    "llama": ("llama_124m", {"n_query_groups": 2, "rope_base": 500000.0}),
    "llama_tied_bias": ("llama_1b", {"n_query_groups": 1, "bias": True}),
    "moe": ("moe_small", {"n_expert": 4}),
}
ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "moe": "MixtralForCausalLM"}


def trained_like(preset: str, **changes) -> GPT:
    """A model whose weights are all away from their initial values (non-zero biases, norms not 1)."""
    cfg = dataclasses.replace(load_preset(preset), **{**SMALL, **changes})
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_exported_model_loads_stock_and_gives_the_same_logits_and_greedy_tokens(family, tmp_path):
    import transformers  # the hf extra; imported here, not by every test worker's collection

    preset, changes = FAMILIES[family]
    model = trained_like(preset, **changes)
    hf_model(model, eot=None).save_pretrained(tmp_path, safe_serialization=True)
    assert {"model.safetensors", "config.json", "generation_config.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # stock classes only
    assert type(loaded).__name__ == ARCH[family.split("_")[0]]
    tokens = torch.randint(0, SMALL["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens)[0], rtol=1e-5, atol=1e-5)
        # the evaluation loss is transformers' (a Mixtral's router term only with output_router_logits)
        torch.testing.assert_close(loaded(tokens, labels=tokens).loss, model(tokens[:, :-1], tokens[:, 1:],
                                                                               with_aux=False)[1])
        prompt = tokens[:, :8]
        ours = model.generate(prompt, 24, top_k=1)  # top-1 sampling is greedy
        theirs = loaded.generate(prompt, max_new_tokens=24, do_sample=False)
        assert torch.equal(theirs, ours)
        # bf16: both sides rounded the same way, within bf16's precision
        model.to(torch.bfloat16), loaded.to(torch.bfloat16)
        torch.testing.assert_close(loaded(tokens).logits.float(), model(tokens)[0].float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("changes, key", [
    ({"norm_position": "post"}, "model.norm_position"),
    ({"position": "none"}, "model.position"),
    ({"position": "rope"}, "model.norm"),
    ({"position": "rope", "norm": "rmsnorm", "mlp": "gelu"}, "model.mlp"),
    ({"mlp": "swiglu"}, "model.mlp"),
    ({"n_query_groups": 2}, "model.n_query_groups"),
    ({"n_expert": 2}, "model.n_expert"),
])
@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
def test_a_gpt2_style_model_with_no_stock_equivalent_is_refused_naming_the_key(changes, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        hf_model(trained_like("tiny", **changes), eot=None)


@pytest.mark.parametrize("preset, changes, key", [
    ("llama_124m", {"dropout": 0.1}, "model.dropout"),
    ("moe_small", {"bias": True, "n_expert": 2}, "model.bias"),
])
def test_a_llama_style_model_with_no_stock_equivalent_is_refused_naming_the_key(preset, changes, key):
    with pytest.raises(ConfigError, match=rf"^{key}=.*not exported"):
        hf_model(trained_like(preset, **changes), eot=None)


@pytest.mark.parametrize("end_of_text", [False, True])
@pytest.mark.slow
def test_the_exported_char_tokenizer_encodes_and_decodes_as_training_did(end_of_text, tmp_path):
    import transformers  # the hf extra; imported here, not by every test worker's collection

    text = SHAKESPEARE.read_text()
    ours = CharTokenizer(sorted(set(text)), end_of_text=end_of_text)
    fast_tokenizer(ours, 64).save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    sample = text[:20000] + "\n\n  spaced   out \n"
    assert theirs(sample)["input_ids"] == ours.encode(sample)
    assert theirs.decode(ours.encode(sample)) == sample
    assert len(theirs) == ours.vocab_size
    assert theirs.eos_token_id == ours.eot
    with pytest.raises(Exception, match="UNK"):  # a character training never saw is refused, as CharTokenizer refuses it
        theirs("~unseen ¤")


@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
def test_the_exported_bpe_tokenizer_encodes_as_training_did(tmp_path):
    import transformers  # the hf extra; imported here, not by every test worker's collection

    text = SHAKESPEARE.read_text()[:200000]
    ours = BPETokenizer.train(text, 400)
    fast_tokenizer(ours, 64).save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    sample = text[-5000:] + " café <|endoftext|> naïve"
    assert theirs(sample)["input_ids"] == ours.encode(sample)
    assert theirs.decode(ours.encode(sample)) == sample
    assert theirs.eos_token_id == ours.eot is not None
