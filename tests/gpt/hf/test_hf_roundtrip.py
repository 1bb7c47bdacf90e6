"""Out of a real run and back in: `python -m gpt.export` on an FSDP checkpoint written by 2 ranks gives the full
model (read in one process), and `init=hf:PATH` starts a run from the exported folder with those weights; a folder
whose shapes differ from the run's model, or whose Mixtral routing is not gptlaunch's, is refused at planning, in
one line."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO, launch  # noqa: E402
from gpt.checkpoint.writer import load_model  # noqa: E402
from gpt.config.data import DataConfig  # noqa: E402
from gpt.config.model import load_preset  # noqa: E402
from gpt.errors import ConfigError, UserError  # noqa: E402
from gpt.data.tokenizer import load_tokenizer  # noqa: E402
from gpt.export import hf_model  # noqa: E402
from gpt.hf.architecture import hf_config  # noqa: E402
from gpt.hf.folder import check_init, load_into  # noqa: E402
from gpt.model.transformer import GPT  # noqa: E402
from test_hf_export import FAMILIES, SMALL, trained_like  # noqa: E402

TRAIN = ["model=tiny", "train.max_steps=4", "train.warmup_steps=1", "train.lr=3e-3", "train.global_batch_size=8",
         "train.eval_interval=0", "checkpoint.interval_steps=0"]


def planned(folder, cfg) -> None:
    """The planning check of init=hf:FOLDER against `cfg`, with the folder's (stand-in) tokenizer.json as the run's."""
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.exists():
        tokenizer.write_text("{}")  # only compared byte for byte here
    check_init(f"hf:{folder}", cfg, DataConfig(tokenizer="hf", tokenizer_file=str(tokenizer)), "auto")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_an_exported_folder_imports_with_the_same_logits(family, tmp_path, caplog):
    model = trained_like(*FAMILIES[family][:1], **FAMILIES[family][1])
    hf_model(model, eot=None).save_pretrained(tmp_path)
    planned(tmp_path, model.cfg)  # config.json agrees with model.* in every key it fixes
    torch.manual_seed(1)
    fresh = GPT(model.cfg)  # model.bias=false takes GPT-2's zero biases
    with caplog.at_level("INFO", logger="gpt.hf.folder"):
        load_into(fresh, f"hf:{tmp_path}")
    said = [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "gpt.hf.folder"]  # a library's
    assert said == [f"weights from init=hf:{tmp_path}"]  # first import may warn too, in whichever test imports it
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(tokens)[0], model(tokens)[0], rtol=1e-5, atol=1e-5)


MOE = dataclasses.replace(load_preset("moe_small"), **SMALL, n_expert=4)


@pytest.mark.parametrize("change, refusal", [
    ({"num_experts_per_tok": 1}, "model.moe_top_k=2 is not valid: 1, as "),
    ({"num_local_experts": 8}, "model.n_expert=4 is not valid: 8, as "),
    ({"router_jitter_noise": 0.01}, "router_jitter_noise is 0 (it has 0.01"),
    ({"sliding_window": 32}, "model.block_size=48 is not valid: at most sliding_window=32, as "),
    ({"hidden_act": "gelu"}, "hidden_act is silu (SwiGLU), not gelu"),
    ({"num_local_experts": None, "num_experts_per_tok": None}, "model.n_expert=4 is not valid: 8, as "),  # defaults
])
def test_a_mixtral_folder_whose_routing_or_shapes_differ_is_refused_at_planning(change, refusal, tmp_path):
    hf_config(MOE, eot=None).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(ConfigError, match="^[^\\n]+$") as refused:  # one line
        planned(tmp_path, MOE)
    assert refusal in str(refused.value)


def test_a_dense_model_is_refused_a_mixtral_folder_at_planning(tmp_path):
    hf_config(MOE, eot=None).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="^model.n_expert=0 is not valid: 4, as "):
        planned(tmp_path, dataclasses.replace(MOE, n_expert=0))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_overrides):
    run_dir = tmp_path_factory.mktemp("fsdp")
    launch(*TRAIN, *data_overrides, "strategy=fsdp", "cluster.tasks_per_node=2", run_dir=run_dir)
    out = tmp_path_factory.mktemp("hf") / "tiny"
    proc = subprocess.run([sys.executable, "-m", "gpt.export", str(run_dir), str(out)], cwd=REPO, check=True,
                          capture_output=True, text=True, timeout=300)
    return run_dir, out, proc.stderr


@pytest.mark.slow
def test_export_of_an_fsdp_checkpoint_loads_in_transformers_with_the_same_logits_and_tokens(exported):
    import transformers  # the hf extra; imported here, not by every test worker's collection

    run_dir, out, _ = exported
    ours, meta, _ = load_model(run_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    text = "ROMEO:\nWhat light through yonder window breaks?"
    tokens = load_tokenizer(meta["data_dir"]).encode(text)
    # as transformers' users call it: the tokenizer's whole output into the model (GPT-2's adds token_type_ids'
    # embeddings where it is given them, which GPT-2's own tokenizer does not give)
    encoded = transformers.AutoTokenizer.from_pretrained(out)(text, return_tensors="pt")
    assert encoded["input_ids"].tolist() == [tokens] and set(encoded) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        torch.testing.assert_close(theirs(**encoded).logits, ours(torch.tensor([tokens]))[0], rtol=1e-5, atol=1e-5)
        greedy = theirs.generate(**encoded, max_new_tokens=12, do_sample=False)
        assert torch.equal(greedy, ours.generate(torch.tensor([tokens]), 12, top_k=1))


@pytest.mark.slow
def test_a_run_initialised_from_the_exported_folder_starts_from_its_weights(exported, data_overrides,
                                                                           tmp_path):
    """With the overrides the export printed, as a user pastes them: the same text, the default model preset."""
    run_dir, out, said = exported
    original, meta, _ = load_model(run_dir)
    (line,) = [x for x in said.splitlines() if x.startswith("train from it: python -m launch ")]
    assert line.endswith(" ...")
    hint = line.removeprefix("train from it: python -m launch ").removesuffix(" ...").split()
    assert f"init=hf:{out}" in hint and f"data.dir={out}-data" in hint
    # a learning rate so small that one step leaves the weights where the import put them
    launch("train.max_steps=1", "train.warmup_steps=0", "train.lr=1e-12", "train.min_lr=0", "train.global_batch_size=8",
           "train.eval_interval=0", data_overrides[0], *hint, run_dir=tmp_path / "run")
    started, _, _ = load_model(tmp_path / "run")
    for key, value in original.state_dict().items():
        torch.testing.assert_close(started.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_a_run_whose_init_folder_was_purged_continues_from_its_own_checkpoint(exported, data_overrides, tmp_path):
    """Once the run has a checkpoint of its own, the folder it was initialised from is read no more, at planning nor
    by a rank: purged meanwhile, it does not stop the same command (nor a requeue, which plans again)."""
    _, out, _ = exported
    folder, tokenizer, run = tmp_path / "hf", tmp_path / "tokenizer.json", tmp_path / "run"
    shutil.copytree(out, folder)
    shutil.copyfile(out / "tokenizer.json", tokenizer)
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    common = ["model=tiny", "train.warmup_steps=0", "train.global_batch_size=8", "train.eval_interval=0",
              "train.decay_steps=4", data_overrides[0], "data.tokenizer=hf", f"data.tokenizer_file={tokenizer}",
              f"data.dir={tmp_path / 'data'}", f"model.vocab_size={vocab}", f"init=hf:{folder}"]
    launch(*common, "train.max_steps=2", run_dir=run)
    shutil.rmtree(folder)
    launch(*common, "train.max_steps=4", run_dir=run)
    attempts = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
    assert [a["first_step"] for a in attempts] == [0, 2]
    assert "is not read: this run continues from its own checkpoints" in (run / "logs" / "rank0.log").read_text()


@pytest.mark.slow
def test_a_folder_whose_shapes_differ_is_refused_before_anything_runs(exported, data_overrides, tmp_path):
    _, out, _ = exported
    proc = launch("model=tiny", "model.n_layer=3", "model.vocab_size=65", *data_overrides, "data.tokenizer=hf",
                  f"data.tokenizer_file={out / 'tokenizer.json'}", f"init=hf:{out}", run_dir=tmp_path / "run",
                  check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"model.n_layer=3 is not valid: 2, as {out / 'config.json'} has it" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


class Payload:
    """What a .bin from an untrusted source may hold: unpickling it would run a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.mark.slow
def test_an_older_sharded_bin_folder_imports_and_one_holding_code_is_refused_unrun(tmp_path):
    model = trained_like(*FAMILIES["llama"][:1], **FAMILIES["llama"][1])
    folder = tmp_path / "bin"
    hf_model(model, eot=None).save_pretrained(folder, safe_serialization=False, max_shard_size="100KB")
    shards = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    assert len(shards) > 1 and not list(folder.glob("*.safetensors")), shards  # as LLaMA-2's older folders are
    planned(folder, model.cfg)
    fresh = GPT(model.cfg)
    load_into(fresh, f"hf:{folder}")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(tokens)[0], model(tokens)[0], rtol=1e-5, atol=1e-5)

    marker = tmp_path / "ran"
    torch.save({**torch.load(folder / shards[0], weights_only=True), "extra": Payload(marker)}, folder / shards[0])
    refusal = rf"^init=hf:{folder}: {shards[0]} holds more than tensors \(Unsupported global: .+\) and is not loaded"
    with pytest.raises(UserError, match=refusal):
        load_into(GPT(model.cfg), f"hf:{folder}")
    assert not marker.exists()
