"""Analytic parameter counts and FLOPs against the model itself, the peak table, and MFU."""
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

from cuda_standin import StrictCuda
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gpt.config.model import ModelConfig, load_preset
from gpt.config.strategy import StrategyConfig
from gpt.config.train import TrainConfig
from gpt.collectives.process_group import DistEnv
from gpt.model.flops import (PEAK_TFLOPS, device_key, flops_per_token, matmul_precision, mfu, param_count,
                             peak_flops)
from gpt.model.transformer import GPT, MoE
from gpt.parallel.base import Strategy
from gpt.parallel.fsdp import FSDP
from gpt.parallel.layout import ParallelDims
from gpt.parallel.layout import split_layers
from gpt.parallel.pipeline import Pipeline
from gpt.train.reporter import RunShape, StepReporter
from helpers import spread

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[3] / "configs" / "model").glob("*.yaml"))


def preset(name: str) -> ModelConfig:
    cfg = load_preset(name)
    return cfg if cfg.vocab_size else dataclasses.replace(cfg, vocab_size=65)


def small(**overrides) -> ModelConfig:
    base = dict(name="test", n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=101, mlp_multiple_of=16)
    cfg = ModelConfig(**{**base, **overrides})
    cfg.validate()
    return cfg


LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", n_query_groups=2, bias=False, tie_embeddings=False)
ARCHITECTURES = {
    "gpt2": {},
    "llama_gqa": LLAMA,
    "llama_mqa_tied": LLAMA | dict(n_query_groups=1, tie_embeddings=True),
    "qwen2_qkv_bias": LLAMA | dict(bias=False, qkv_bias=True),
    "moe_top2": LLAMA | dict(n_expert=4, moe_top_k=2),
    "moe_top1_gelu": dict(n_expert=3, moe_top_k=1),
    "post_norm_relu_nopos": dict(norm_position="post", mlp="relu", position="none", norm="layernorm_nobias"),
}


# --- parameter counts ---------------------------------------------------------------------------------------


def instantiated_counts(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for block in model.layers.values():
        if isinstance(block.mlp, MoE):
            expert = sum(p.numel() for p in block.mlp.experts[0].parameters())
            idle += (cfg.n_expert - cfg.moe_top_k) * expert
    return {"total": total, "embedding": total - model.num_parameters(non_embedding=True),
            "non_embedding": model.num_parameters(non_embedding=True), "active": total - idle}


@pytest.mark.parametrize("name", spread("name", PRESETS, 3))
def test_param_count_matches_every_preset(name):
    cfg = preset(name)
    assert param_count(cfg) == instantiated_counts(cfg)


GRID = list(itertools.product(["layernorm", "layernorm_nobias", "rmsnorm"], ["learned", "rope", "none"],
                              ["gelu", "swiglu"], [True, False]))


@pytest.mark.parametrize("norm,position,mlp,bias", GRID)
def test_param_count_matches_component_grid(norm, position, mlp, bias):
    cfg = small(norm=norm, position=position, mlp=mlp, bias=bias)
    assert param_count(cfg) == instantiated_counts(cfg)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_param_count_matches_architectures(arch):
    cfg = small(**ARCHITECTURES[arch])
    assert param_count(cfg) == instantiated_counts(cfg)


def test_param_count_known_models():
    assert param_count(load_preset("gpt2_124m"))["total"] == 124_475_904  # nanoGPT's 124.48M (vocab 50304)
    # LLaMA 3.2 1B has 1,235,814,400 parameters with its 128,256-token vocabulary; this preset has 32,000.
    assert param_count(load_preset("llama_1b"))["total"] == 1_235_814_400 - (128_256 - 32_000) * 2048
    moe = param_count(load_preset("moe_small"))
    assert moe["active"] < moe["total"]


# --- FLOPs --------------------------------------------------------------------------------------------------


def measured_flops_per_token(cfg: ModelConfig, T: int, B: int = 2) -> float:
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    # The math SDPA backend runs attention as bmm's, which FlopCounterMode counts; the CPU flash kernel is not
    # in its table and would count as 0.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    return counter.get_total_flops() / (B * T)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("T", [32, 12])
def test_flops_per_token_matches_flop_counter(arch, T):
    # The analytic count covers every matmul the model runs, so it agrees exactly (the brief allowed 5%;
    # exact agreement catches a missing router or a wrongly sized k/v projection, which 5% could hide).
    # For MoE the counter sees what actually ran, and that is load-independent: each token goes to exactly
    # top_k experts and an expert's FLOPs are linear in its tokens, so any routing costs N * top_k expert passes.
    cfg = small(**ARCHITECTURES[arch])
    assert flops_per_token(cfg, seq_len=T) == pytest.approx(measured_flops_per_token(cfg, T), rel=1e-9)


def test_flops_per_token_palm_formula_for_gpt2_124m():
    L, C, V, T = 12, 768, 50304, 1024
    n = L * (4 * C * C + 2 * C * 4 * C) + C * V  # attention, MLP, lm_head matmuls
    assert flops_per_token(load_preset("gpt2_124m")) == 6 * n + 12 * L * 12 * 64 * T
    assert flops_per_token(load_preset("gpt2_124m"), seq_len=512) == 6 * n + 12 * L * 12 * 64 * 512


def test_flops_scale_with_active_experts_not_all():
    dense = small(**LLAMA)
    top1, top2 = small(**LLAMA, n_expert=8, moe_top_k=1), small(**LLAMA, n_expert=8, moe_top_k=2)
    mlp = 6 * 3 * 64 * dense.mlp_hidden * dense.n_layer
    router = 6 * 64 * 8 * dense.n_layer
    assert flops_per_token(top1) == flops_per_token(dense) + router
    assert flops_per_token(top2) == flops_per_token(dense) + router + mlp


# --- peaks and MFU ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "h100_sxm"),
    ("NVIDIA H100 PCIe", "h100_pcie"),
    ("NVIDIA H100 NVL", "h100_nvl"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA GH200 480GB", "gh200"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100 80GB PCIe", "a100"),
    ("Tesla V100-SXM2-16GB", "v100_sxm"),
    ("Tesla V100-PCIE-32GB", "v100_pcie"),
    ("Tesla V100S-PCIE-32GB", "v100s"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA A10", "a10"),
    ("AMD Instinct MI300X", "mi300x"),
    ("AMD Instinct MI250X/MI250", "mi250x"),
    ("NVIDIA A10G", "a10g"),
    ("NVIDIA L40", "l40"),
    ("NVIDIA H200 NVL", "h200_nvl"),
    ("NVIDIA H800", "h800_sxm"),
    ("NVIDIA H800 PCIe", "h800_pcie"),
    ("NVIDIA A800-SXM4-80GB", "a800"),
    ("NVIDIA B200", "b200"),
    # Not in the table: no guessing from a similar name.
    ("NVIDIA GB200", None),
    ("NVIDIA GeForce RTX 4090", None),
    ("cpu", None),
    ("", None),
])
def test_device_key(name, key):
    assert device_key(name) == key


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "tf32") == 495e12
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == 67e12
    assert peak_flops("NVIDIA H100 PCIe", "fp16") == 756e12
    assert peak_flops("NVIDIA H200", "bf16") == peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert peak_flops("NVIDIA A100-SXM4-40GB", "bf16") == 312e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "fp32") == 19.5e12
    assert peak_flops("Tesla V100-SXM2-16GB", "fp16") == 125e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores
    assert peak_flops("Tesla V100-SXM2-16GB", "tf32") == 15.7e12  # no TF32 either: fp32 matmuls
    assert peak_flops("cpu", "fp32") is None
    assert peak_flops(None, "bf16") is None
    assert peak_flops("NVIDIA A10G", "bf16") == 70e12  # not the A10's 125: AWS's variant has fewer tensor FLOP/s
    assert peak_flops("NVIDIA H800", "bf16") == peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert peak_flops("NVIDIA B200", "bf16") == 2250e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp8") is None
    for (key, dtype), tflops in PEAK_TFLOPS.items():
        assert dtype in {"bf16", "fp16", "tf32", "fp32"} and 10 < tflops < 2500, (key, dtype)
    for key in {k for k, _ in PEAK_TFLOPS}:  # a typo check: fp16 > tf32 (where present) >= fp32 (equal on an L40)
        rates = [PEAK_TFLOPS[(key, d)] for d in ("fp16", "tf32", "fp32") if (key, d) in PEAK_TFLOPS]
        assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1], key


def test_mfu():
    fpt = flops_per_token(load_preset("gpt2_124m"))
    peak = peak_flops("NVIDIA A100-SXM4-80GB", "bf16")
    # nanoGPT's GPT-2 124M on an A100 at about 29% MFU runs about 0.29 * 312e12 / fpt tokens/s.
    assert mfu(0.29 * 312e12 / fpt, fpt, peak) == pytest.approx(0.29)
    assert mfu(1000.0, fpt, None) is None
    assert mfu(0.0, fpt, peak) == 0.0
    with pytest.warns(RuntimeWarning, match="exceeds 100%"):
        assert mfu(2 * peak / fpt, fpt, peak) == 1.0


H100 = "NVIDIA H100 80GB HBM3"


def test_matmul_precision():
    assert matmul_precision("fp32", tf32=True) == "tf32"
    assert matmul_precision("fp32", tf32=False) == "fp32"
    assert matmul_precision("bf16", tf32=True) == "bf16"  # autocast's matmuls: the bf16 peak
    assert peak_flops(H100, matmul_precision("fp32", tf32=True)) == 495e12


@pytest.mark.parametrize("precision, tf32, peak", [("fp32", True, 495e12), ("fp32", False, 67e12),
                                                    ("bf16", True, 989e12)])
def test_the_reporters_peak_is_the_precision_its_matmuls_run_at(monkeypatch, precision, tf32, peak):
    """fp32 training on a GPU runs its matmuls on TF32 tensor cores (gpt.train.build turns them on): MFU divides
    by the TF32 peak, not by the fp32 one, which is 7x lower on an H100."""
    StrictCuda(name=H100).install(monkeypatch)
    gpu, before = torch.device("cuda", 0), torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32  # a process-wide flag (not an attribute monkeypatch can set)
    try:
        strategy = Strategy(StrategyConfig(name="single"), DistEnv(), gpu, precision, ParallelDims())
        shape = RunShape(DistEnv(), strategy, small(), TrainConfig(precision=precision), gpu, Path("."), 1, 1)
        assert StepReporter(shape, None, None, None).peak == peak
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def pipeline_rank(pp_rank: int, dims: ParallelDims, cfg: ModelConfig) -> Pipeline:
    """The strategy object of one pipeline rank, as far as its FLOPs share needs it (no process group)."""
    strategy = Pipeline(StrategyConfig(name="pipeline"), DistEnv(), torch.device("cpu"), "fp32", dims)
    strategy.model_cfg, strategy.runs = cfg, split_layers(cfg.n_layer, dims.pp)
    strategy.stages = {pp_rank: None}
    return strategy


@pytest.mark.parametrize("dims", [ParallelDims(dp_shard=4), ParallelDims(dp_shard=2, tp=2), ParallelDims(tp=4),
                                  ParallelDims(pp=2, dp_shard=1, tp=2), ParallelDims(pp=2, dp_shard=2, tp=2)])
def test_the_ranks_flops_add_up_to_the_jobs(dims):
    """The reporter's arithmetic: a rank computes flops_share() of each token its replica trains on. Summed over
    the ranks, that is every token's FLOPs once; tensor parallelism splits them over the tp ranks (else MFU
    under tp reads tp times too high)."""
    cfg, tokens_per_s = small(n_layer=4), 1000.0
    fpt = flops_per_token(cfg)
    if dims.pp > 1:
        shares = [pipeline_rank(r // (dims.dp * dims.tp), dims, cfg).flops_share() for r in range(dims.world_size)]
    else:
        shares = [FSDP(StrategyConfig(name="fsdp"), DistEnv(), torch.device("cpu"), "fp32", dims).flops_share()] * dims.world_size
    rank_flops = [tokens_per_s / dims.dp * fpt * share for share in shares]
    assert sum(rank_flops) == pytest.approx(tokens_per_s * fpt)
    peak = peak_flops(H100, "bf16")
    assert mfu(tokens_per_s / dims.dp, fpt * shares[0], peak) == pytest.approx(rank_flops[0] / peak)
