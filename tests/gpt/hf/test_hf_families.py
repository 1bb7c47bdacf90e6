"""The families people start from, in folders written by transformers itself (tiny configs, `save_pretrained`):
Llama 3.x with its RoPE scaling, Qwen2 with q/k/v biases, Mistral with its sliding window, SmolLM (a Llama config),
GPT-2 and Mixtral. `init=hf:PATH` fills model.* from config.json, the run's model gives transformers' logits, and
its export loads in transformers' own classes with the same logits; bf16 export and sharding."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gpt.config.model import ModelConfig, load_preset  # noqa: E402
from gpt.errors import ConfigError  # noqa: E402
from gpt.export import hf_model, main as export_main  # noqa: E402
from gpt.hf.folder import filled_model, load_into  # noqa: E402
from gpt.model.transformer import GPT, llama3_frequencies  # noqa: E402
from launch.planning.plan import given_model_keys  # noqa: E402
from test_hf_roundtrip import planned  # noqa: E402

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}  # short, so that a 48-token block crosses it
SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
FAMILIES = {  # the family's transformers config, as its model cards' config.json would say it, tiny
    "llama3.2": ("LlamaConfig", dict(**SHAPE, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
                                     tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "smollm": ("LlamaConfig", dict(**SHAPE, tie_word_embeddings=True, rope_theta=10000.0)),  # SmolLM is LLaMA
    "qwen2.5": ("Qwen2Config", dict(**SHAPE, rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False)),
    "mistral": ("MistralConfig", dict(**SHAPE, sliding_window=64)),
    "mixtral": ("MixtralConfig", dict(**SHAPE, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "gpt2": ("GPT2Config", dict(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4)),
}
BLOCK = 48


def config_of(family: str):
    """The family's transformers config (transformers imported here, not by every test worker's collection)."""
    import transformers

    name, values = FAMILIES[family]
    return getattr(transformers, name)(**values)


def written_by_transformers(family: str, folder):
    """The family's model with every weight away from its initial value (biases not zero, norms not one), saved."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_of(family))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model.eval()


def test_llama3_frequencies_are_transformers():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig(n_embd=256, n_head=2, position="rope", rope_base=500000.0, rope_scaling="llama3",
                      rope_factor=32.0, rope_original_context=8192)
    theirs, scale = ROPE_INIT_FUNCTIONS["llama3"](transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=2, rope_theta=500000.0,
        rope_scaling={**LLAMA3_SCALING, "original_max_position_embeddings": 8192}), "cpu")
    plain = 500000.0 ** -(torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    assert scale == 1.0
    torch.testing.assert_close(llama3_frequencies(plain, cfg), theirs, rtol=1e-6, atol=0)
    assert not torch.allclose(plain, theirs)  # the rule changes some frequencies at this length


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_folder_transformers_wrote_fills_the_model_and_gives_its_logits_in_and_out(family, tmp_path):
    import transformers

    theirs = written_by_transformers(family, tmp_path / "in")
    cfg = filled_model(f"hf:{tmp_path / 'in'}", ModelConfig(block_size=BLOCK), given=set())
    planned(tmp_path / "in", cfg)  # the filled model passes planning's check
    ours = GPT(cfg)
    load_into(ours, f"hf:{tmp_path / 'in'}")
    tokens = torch.randint(0, 97, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(tokens).logits
        torch.testing.assert_close(ours.eval()(tokens)[0], expected, rtol=0, atol=1e-4)
        hf_model(ours, eot=None).save_pretrained(tmp_path / "out")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(back(tokens).logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("override, refusal", [
    ("model.n_layer=3", "model.n_layer=3 is not valid: 2, as "),
    ("model.qkv_bias=false", "model.qkv_bias=False is not valid: True, as "),
    ("model.rope_base=10000", "model.rope_base=10000 is not valid: 1000000.0, as "),
])
@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
def test_a_key_the_command_sets_that_disagrees_with_config_json_is_refused_naming_both(override, refusal, tmp_path):
    written_by_transformers("qwen2.5", tmp_path)
    key, _, value = override.partition("=")
    typed = {"n_layer": 3, "qkv_bias": False, "rope_base": 10000.0}[key.removeprefix("model.")]
    given = given_model_keys(["model=tiny", override, "train.lr=0.1"])
    assert given == {key.removeprefix("model.")}
    cfg = filled_model(f"hf:{tmp_path}", dataclasses.replace(ModelConfig(block_size=BLOCK), **{
        key.removeprefix("model."): typed}), given)
    with pytest.raises(ConfigError, match="^[^\\n]+$") as refused:  # one line
        planned(tmp_path, cfg)
    assert refusal in str(refused.value)


@pytest.mark.parametrize("family, change, block, refusal", [
    ("mistral", {"sliding_window": 32}, BLOCK, "model.block_size=48 is not valid: at most sliding_window=32, as "),
    ("mistral", {"sliding_window": None}, 8192, "model.block_size=8192 is not valid: at most sliding_window=4096"),
    ("qwen2.5", {"use_sliding_window": True, "sliding_window": 32}, BLOCK, "at most sliding_window=32"),
    ("llama3.2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, BLOCK, "rope_scaling is none or llama3"),
])
def test_what_gptlaunch_does_not_compute_is_refused_at_planning(family, change, block, refusal, tmp_path):
    config_of(family).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(ConfigError, match="^[^\\n]+$") as refused:
        planned(tmp_path, filled_model(f"hf:{tmp_path}", ModelConfig(block_size=block), set()))
    assert refusal in str(refused.value)


@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
def test_export_in_bf16_sharded_with_an_index_loads_with_the_same_logits(tmp_path, monkeypatch):
    import transformers

    theirs = written_by_transformers("llama3.2", tmp_path / "in")
    ours = GPT(filled_model(f"hf:{tmp_path / 'in'}", ModelConfig(block_size=BLOCK), set()))
    load_into(ours, f"hf:{tmp_path / 'in'}")
    monkeypatch.setattr("gpt.checkpoint.writer.load_model", lambda path: (ours, {"data_dir": None}, path))
    monkeypatch.setattr("gpt.data.tokenizer.load_tokenizer", lambda data_dir: type("T", (), {"eot": None})())
    monkeypatch.setattr("gpt.hf.tokenizer.save_tokenizer", lambda *args: None)
    export_main([str(tmp_path / "ckpt"), str(tmp_path / "out"), "--dtype", "bf16", "--max-shard-size", "20KB"])
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file(), shards
    mode = (tmp_path / "out" / "config.json").stat().st_mode & 0o777  # as the umask allows, not safetensors' 0600
    assert {(tmp_path / "out" / s).stat().st_mode & 0o777 for s in shards} == {mode}, oct(mode)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")  # as config.json says
    assert back.dtype == torch.bfloat16
    tokens = torch.randint(0, 97, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(tokens).logits.float(), theirs(tokens).logits, rtol=0.05, atol=0.05)


def test_init_alone_composes_the_folders_model_and_a_command_key_stays_the_commands(tmp_path):
    """What `python -m launch` and its dry run compose: init=hf:PATH with the default preset (a GPT-2-style
    shakespeare_cpu) gives the folder's Llama 3.2, the preset keeping what config.json does not say (block size), a
    key the command sets keeping its value (planning then refuses it, as above)."""
    from launch.dry_run import compose

    written_by_transformers("llama3.2", tmp_path)
    run = compose([f"init=hf:{tmp_path}", "model.n_layer=3"])
    assert (run.model.position, run.model.norm, run.model.rope_scaling, run.model.rope_factor) == (
        "rope", "rmsnorm", "llama3", 32.0)
    assert (run.model.vocab_size, run.model.mlp_hidden, run.model.n_query_groups, run.model.tie_embeddings) == (
        97, 88, 2, True)
    assert (run.model.n_layer, run.model.block_size) == (3, load_preset("shakespeare_cpu").block_size)


def test_a_shard_size_without_a_unit_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """A bad --max-shard-size failed after config.json was written, and the folder, no longer empty, refused the
    retry: it is one line before the checkpoint is even read."""
    monkeypatch.setattr("gpt.checkpoint.writer.load_model", lambda path: pytest.fail("read the checkpoint"))
    with pytest.raises(SystemExit) as stop:
        export_main([str(tmp_path / "ckpt"), str(tmp_path / "out"), "--max-shard-size", "10"])
    assert stop.value.code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err.strip() == ("error: --max-shard-size 10: a number and a unit (KB, MB, GB, TB), "
                                               "e.g. 5GB or 500MB")
