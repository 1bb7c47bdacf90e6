"""benchmarks/peers.py without a GPU: the table's ratios, the rows a call runs, gptlaunch's command line at the peers'
shape and tokens per step, and each peer's loop at tiny shapes on the CPU (nanoGPT's model.py interface in a
stand-in here, nanoGPT not being vendored; transformers' Llama itself)."""
from __future__ import annotations

import argparse
import importlib
import sys

import pytest

from benchmarks import peers

ROWS = [
    {"pair": "llama", "label": "gptlaunch", "side": "ours", "shape": "8 x 2,048 x 4", "tokens_per_s": 78_000.0,
     "step_s": 0.84, "mfu": 0.553, "peak_gib": 42.1},
    {"pair": "llama", "label": "gptlaunch fp8", "side": "ours", "shape": "8 x 2,048 x 4", "tokens_per_s": 97_500.0,
     "step_s": 0.67, "mfu": 0.69, "peak_gib": 40.0, "reserved_gib": 44.5},
    {"pair": "llama", "label": "gptlaunch x", "side": "ours", "shape": "8 x 2,048 x 4",
     "error": "exit 2: error: train.precision='fp9' is not valid"},
    {"pair": "llama", "label": "transformers Llama", "side": "peer", "shape": "8 x 2,048 x 4",
     "tokens_per_s": 65_000.0, "step_s": 1.0, "mfu": 0.46, "peak_gib": 50.0},
]

NANOGPT = '''from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)

    def forward(self, idx, targets=None):
        logits = self.head(self.wte(idx))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        print(f"using fused AdamW: {device_type == 'cuda'}")
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, fused=device_type == "cuda")
'''


def test_where_each_traced_rows_step_went_is_one_line_a_row_in_the_first_rows_families():
    trace = {"source": "device", "steps": 2, "span_ms": 140.3, "busy_ms": 133.3,
             "families": {"matmul": 68.7, "fused (Triton)": 38.2, "attention": 15.4}}
    peer = {**trace, "span_ms": 134.0, "families": {"fused (Triton)": 35.0, "matmul": 68.0, "attention": 15.0}}
    rows = [{**ROWS[0], "trace": trace}, ROWS[2], {**ROWS[3], "trace": peer}]
    lines = peers.trace_table(rows).splitlines()
    assert lines[0] == "| pair | row | where | span | busy | matmul | fused (Triton) | attention |"
    assert lines[2:] == ["| llama | gptlaunch | device | 140.3 | 133.3 | 68.7 | 38.2 | 15.4 |",
                         "| llama | transformers Llama | device | 134.0 | 133.3 | 68.0 | 35.0 | 15.0 |"]


def test_each_gptlaunch_row_is_divided_by_its_pairs_peer_and_first_row():
    lines = peers.table(ROWS).splitlines()
    assert lines[2].endswith("| 78,000 | 0.8400 | 55.3% | 42.1 | 1.20x | - |")
    assert lines[3].endswith("| 97,500 | 0.6700 | 69.0% | 40.0 (44.5) | 1.50x | 1.25x |")  # reserved: graph pools
    assert "| exit 2: error: train.precision='fp9' is not valid |" in lines[4]  # a refused row, the others go on
    assert lines[5].endswith("| 65,000 | 1.0000 | 46.0% | 50.0 | - | - |")


@pytest.mark.slow  # builds and times a model: seconds
def test_gptlaunch_runs_at_the_peers_shape_and_tokens_per_step(tmp_path):
    args = argparse.Namespace(pair=None, ours=[peers.variant("fp8=train.precision=fp8,train.compile=true")],
                              nanogpt=None, tiny=False)
    rows = [(pair.name, label, side, extra) for pair, label, side, extra in peers.rows_of(args)]
    assert rows == [("gpt2", "gptlaunch", "ours", []),  # no nanoGPT checkout named: ours alone
                    ("gpt2", "gptlaunch fp8", "ours", ["train.precision=fp8", "train.compile=true"]),
                    ("llama", "gptlaunch", "ours", []),
                    ("llama", "transformers Llama", "peer", []),  # the pair's own comparison before the variants
                    ("llama", "gptlaunch fp8", "ours", ["train.precision=fp8", "train.compile=true"])]
    cmd = peers.ours_command(peers.PAIRS["llama"], 10, False, ["train.precision=fp8"], tmp_path)
    assert {"model=llama_1b", "train=gpu", "train.global_batch_size=32", "train.micro_batch_size=8",
            "train.max_steps=20", "train.log_interval=10"} <= set(cmd) and cmd[-1] == "train.precision=fp8"
    assert not any(o.startswith("profile.") for o in cmd)
    # --trace: the profiled steps after the timed window (steps 10-19), which the metrics record of step 19 closes
    traced = peers.ours_command(peers.PAIRS["llama"], 10, False, [], tmp_path, trace=True)
    assert {"train.max_steps=22", "train.decay_steps=22", "train.log_interval=10", "profile.steps=20-21"} <= set(traced)
    assert peers.block(peers.PAIRS["llama"]) == 2048 and peers.block(peers.PAIRS["gpt2"]) == 1024
    with pytest.raises(argparse.ArgumentTypeError):
        peers.variant("fp8")


@pytest.mark.slow  # builds and times a model: seconds
def test_nanogpts_model_is_built_at_our_shape_and_timed_on_the_cpu(tmp_path):
    (tmp_path / "model.py").write_text(NANOGPT)
    pair = peers.TINY["gpt2"]
    model, opt, loss = peers.nanogpt_model(pair, tmp_path, "cpu")
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size, model.config.vocab_size,
            model.config.bias) == (2, 64, 32, 2048, True)  # gpt2_124m's biases
    result = peers.timed_loop(pair, 1, "cpu", model, opt, loss, trace_to=tmp_path / "peer.pt.trace.json")
    assert result["tokens_per_s"] > 0 and result["mfu"] is None and result["loss"] > 0
    # --trace: two more steps profiled, as gptlaunch's traces name them, and where they went
    assert (result["trace"]["source"], result["trace"]["steps"]) == ("host", peers.TRACED)
    assert result["trace"]["families"]["matmul"] > 0
    # torch.compile imports the module of the code it traces by name: on a GPU the row failed with "No module named
    # 'nanogpt_model'" while it was loaded from its file alone
    assert importlib.import_module(type(model).__module__) is sys.modules[type(model).__module__]


@pytest.mark.slow  # importing transformers and compiling nothing still takes seconds alone
def test_transformers_llama_is_built_at_our_shape_and_timed_on_the_cpu():
    pair = peers.TINY["llama"]
    model, opt, loss = peers.hf_model(pair, "cpu")
    conf = model.config
    assert (type(model).__name__, conf.num_hidden_layers, conf.hidden_size, conf.num_key_value_heads,
            conf.vocab_size, conf._attn_implementation) == ("LlamaForCausalLM", 2, 64, 2, 2048, "sdpa")
    assert peers.timed_loop(pair, 1, "cpu", model, opt, loss)["tokens_per_s"] > 0
