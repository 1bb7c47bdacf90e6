"""Analytic parameter counts, training FLOPs per token, peak device FLOP/s and model FLOPs utilisation (MFU).

Everything here is computed from the ModelConfig alone, so a sweep can be planned without building a model (torch-free).
MFU is only reported against a known peak: an unknown device or the CPU gives None ("n/a"), never a guess.
"""
from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING

from gpt.config.model import ModelConfig

if TYPE_CHECKING:
    import torch

# Dense (no sparsity) peak TFLOP/s per torch device, from the vendors' datasheets. "fp32" is the non-tensor-core
# rate; "tf32" applies when fp32 matmuls run on tensor cores (torch.backends.cuda.matmul.allow_tf32).
# An MI250X is two GCDs and torch sees each as one device, so its entries are half the card's figures.
PEAK_TFLOPS: dict[tuple[str, str], float] = {}
for _key, (_bf16, _tf32, _fp32) in {
    "h100_sxm": (989.0, 495.0, 67.0),
    "h100_pcie": (756.0, 378.0, 51.0),
    "h100_nvl": (835.0, 418.0, 60.0),
    "h200": (989.0, 495.0, 67.0),
    "gh200": (989.0, 495.0, 67.0),
    "a100": (312.0, 156.0, 19.5),
    "l40s": (362.0, 183.0, 91.6),
    "l4": (121.0, 60.0, 30.3),
    "a10": (125.0, 62.5, 31.2),
    "mi300x": (1307.4, 653.7, 163.4),
    # H200 NVL: NVIDIA H200 datasheet (1,671 bf16 / 835 tf32 with sparsity, 60 fp32), halved for dense.
    "h200_nvl": (835.0, 418.0, 60.0),
    # A10G (AWS G5): lower tensor rates than the A10 (baseten.co, "NVIDIA A10 vs A10G for ML model inference").
    "a10g": (70.0, 35.0, 31.2),
    # L40: NVIDIA L40 datasheet (362.1 bf16 / 181 tf32 with sparsity, 90.5 fp32).
    "l40": (181.0, 90.5, 90.5),
    # H800 and A800: the export variants of H100 and A100, with the same tensor and fp32 rates (NVIDIA datasheets).
    "h800_sxm": (989.0, 495.0, 67.0),
    "h800_pcie": (756.0, 378.0, 51.0),
    "a800": (312.0, 156.0, 19.5),
    # B200 in HGX at 1,000 W: NVIDIA HGX B200 datasheet (4.5 PF bf16 / 2.2 PF tf32 with sparsity, 80 fp32).
    "b200": (2250.0, 1100.0, 80.0),
}.items():
    PEAK_TFLOPS.update({(_key, "bf16"): _bf16, (_key, "fp16"): _bf16, (_key, "tf32"): _tf32, (_key, "fp32"): _fp32})
PEAK_TFLOPS.update({
    # No bf16 and no TF32 on these: fp32 matmuls run at the fp32 rate.
    ("v100_sxm", "fp16"): 125.0, ("v100_sxm", "fp32"): 15.7,
    ("v100_pcie", "fp16"): 112.0, ("v100_pcie", "fp32"): 14.0,
    ("v100s", "fp16"): 130.0, ("v100s", "fp32"): 16.4,
    ("mi250x", "bf16"): 191.5, ("mi250x", "fp16"): 191.5, ("mi250x", "fp32"): 47.9,
})

# GiB of memory per device, for the planner's fit check (launch.planning.memory_fit); a name that says its size ("NVIDIA
# A100-SXM4-80GB") is read instead. An A100, A800 or H100 PCIe comes in two sizes: the smaller one, so the check
# errs on the side of refusing, and cluster.gpu_memory_gb says otherwise.
MEMORY_GIB: dict[str, float] = {
    "h100_sxm": 80, "h100_pcie": 80, "h100_nvl": 94, "h200": 141, "h200_nvl": 141, "gh200": 96, "a100": 40,
    "a800": 40, "h800_sxm": 80, "h800_pcie": 80, "b200": 180, "l40s": 48, "l40": 48, "l4": 24, "a10": 24, "a10g": 24,
    "v100_sxm": 16, "v100_pcie": 16, "v100s": 32, "mi300x": 192, "mi250x": 64,
}
SIZE_IN_NAME = re.compile(r"(\d+)\s*gb\b")

# Patterns on the lower-cased torch.cuda.get_device_name(), most specific first. Word boundaries keep
# "A10G" (a different chip) from matching "a10" and "L40S" from matching "l4".
_DEVICE_PATTERNS: list[tuple[str, str]] = [
    (r"\bgh200\b", "gh200"),
    (r"\bh200\b.*\bnvl\b", "h200_nvl"),
    (r"\bh200\b", "h200"),
    (r"\bh100\b.*\bpcie\b", "h100_pcie"),
    (r"\bh100\b.*\bnvl\b", "h100_nvl"),
    (r"\bh100\b", "h100_sxm"),  # "NVIDIA H100 80GB HBM3"
    (r"\ba100\b", "a100"),  # SXM and PCIe have the same peaks
    (r"\bh800\b.*\bpcie\b", "h800_pcie"),
    (r"\bh800\b", "h800_sxm"),
    (r"\ba800\b", "a800"),
    (r"\bb200\b", "b200"),
    (r"\bl40s\b", "l40s"),
    (r"\bl40\b", "l40"),
    (r"\bl4\b", "l4"),
    (r"\ba10g\b", "a10g"),
    (r"\ba10\b", "a10"),
    (r"\bv100s\b", "v100s"),
    (r"\bv100\b.*\bpcie\b", "v100_pcie"),
    (r"\bv100\b", "v100_sxm"),
    (r"\bmi300x\b", "mi300x"),
    (r"\bmi250x\b", "mi250x"),  # ROCm names both MI250X and MI250 "MI250X/MI250": the higher peak, so MFU errs low
]

_DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                "tf32": "tf32", "fp32": "fp32", "float32": "fp32", "float": "fp32"}


def device_key(torch_device_name: str | None) -> str | None:
    """The PEAK_TFLOPS key for a torch.cuda.get_device_name() string, or None if the device is not known."""
    if not torch_device_name:
        return None
    name = torch_device_name.lower()
    for pattern, key in _DEVICE_PATTERNS:
        if re.search(pattern, name):
            return key
    return None


def memory_gib(device_name: str | None) -> float | None:
    """GiB of memory of a device by its name (torch's, or a Slurm GPU type such as a100), or None if not known."""
    size = SIZE_IN_NAME.search((device_name or "").lower())
    if size:
        return float(size[1])
    key = device_key(device_name)
    return MEMORY_GIB.get(key) if key else None


def peak_flops(device_name: str | None, dtype: str | torch.dtype) -> float | None:
    """Dense peak FLOP/s of one device for matmuls in dtype ('bf16', 'fp16', 'tf32', 'fp32' or a torch dtype).

    Pass 'tf32' for fp32 training with TF32 matmuls enabled on Ampere or newer. None for the CPU, an unknown
    device, or a dtype the device has no peak for (bf16 on a V100).
    """
    key = device_key(device_name)
    name = str(dtype).removeprefix("torch.")
    if key is None or name not in _DTYPE_NAMES:
        return None
    dt = _DTYPE_NAMES[name]
    if dt == "tf32" and (key, "tf32") not in PEAK_TFLOPS:
        dt = "fp32"  # no TF32 units: the allow_tf32 flag is ignored and matmuls run in fp32
    tflops = PEAK_TFLOPS.get((key, dt))
    return None if tflops is None else tflops * 1e12


def matmul_precision(precision: str, tf32: bool) -> str:
    """The precision whose peak a run's MFU divides by: train.precision, except that fp32 training runs its matmuls
    on TF32 tensor cores when torch allows it (torch.backends.cuda.matmul.allow_tf32, which
    torch.set_float32_matmul_precision("high") also sets; gpt.train.build turns it on for fp32 GPU runs), and fp8
    counts against the bf16 peak: the table has no fp8 peaks, only the large matmuls run in float8, and a float8
    run's MFU then compares with a bf16 run's directly (its speed-up is the ratio of the two)."""
    if precision == "fp8":
        return "bf16"
    return "tf32" if precision == "fp32" and tf32 else precision


def norm_params(cfg: ModelConfig) -> int:
    return 2 * cfg.n_embd if cfg.norm == "layernorm" else cfg.n_embd


def _mlp_params(cfg: ModelConfig) -> int:
    """One dense MLP, or one expert."""
    C, H = cfg.n_embd, cfg.mlp_hidden
    if cfg.mlp == "swiglu":
        return 3 * C * H + (2 * H + C if cfg.bias else 0)
    return 2 * C * H + (H + C if cfg.bias else 0)


def param_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of GPT(cfg), counted from the config.

    total: every parameter, tied ones once. embedding: wte and wpe. non_embedding: total - embedding (an
    untied lm_head is non-embedding). active: parameters a token touches: for MoE, top_k of the n_expert
    experts in each layer (the router always).
    """
    if cfg.vocab_size is None:
        raise ValueError("cfg.vocab_size is None; set it from the tokenizer first")
    C, kv = cfg.n_embd, cfg.n_kv_head * cfg.head_dim
    attn = 2 * C * C + 2 * C * kv + (C + 2 * kv if cfg.bias or cfg.qkv_bias else 0) + (C if cfg.bias else 0)
    mlp = cfg.n_expert * _mlp_params(cfg) + C * cfg.n_expert if cfg.n_expert else _mlp_params(cfg)
    layer = attn + mlp + 2 * norm_params(cfg)
    embedding = cfg.vocab_size * C + (cfg.block_size * C if cfg.position == "learned" else 0)
    total = (embedding + cfg.n_layer * layer
             + (norm_params(cfg) if cfg.norm_position == "pre" else 0)
             + (0 if cfg.tie_embeddings else cfg.vocab_size * C))
    idle_experts = cfg.n_layer * (cfg.n_expert - cfg.moe_top_k) * _mlp_params(cfg) if cfg.n_expert else 0
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "active": total - idle_experts}


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token at sequence length seq_len (default block_size).

    PaLM's convention: 6 * N + 12 * L * H * Q * T, with N the weights of the matmuls a token goes through
    (q, k, v, o with grouped-query-sized k and v; the MLP's 2 or 3 matrices, or top_k experts and the router;
    the lm_head) and 12 * L * H * Q * T the attention scores and weighted sum. Causal masking is not halved:
    that is what kernels compute. Biases, norms, softmax and element-wise ops are ignored; embedding lookups
    are free. A forward is 2 FLOPs per multiply-add, a backward twice the forward.
    """
    if cfg.vocab_size is None:
        raise ValueError("cfg.vocab_size is None; set it from the tokenizer first")
    T = cfg.block_size if seq_len is None else seq_len
    C, H = cfg.n_embd, cfg.mlp_hidden
    attn = 2 * C * C + 2 * C * cfg.n_kv_head * cfg.head_dim
    mlp = (3 if cfg.mlp == "swiglu" else 2) * C * H
    if cfg.n_expert:
        mlp = cfg.moe_top_k * mlp + C * cfg.n_expert
    n_matmul = cfg.n_layer * (attn + mlp) + C * cfg.vocab_size
    return 6.0 * n_matmul + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * T


def mfu(tokens_per_sec_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one device: achieved FLOP/s over peak FLOP/s. None when the peak is unknown.

    Clipped to 1.0; a reading above it means a wrong peak or FLOPs count, and warns.
    """
    if peak is None or peak <= 0:
        return None
    value = tokens_per_sec_per_device * flops_per_token / peak
    if value > 1.0:
        warnings.warn(f"MFU {value:.0%} exceeds 100%: the peak or the FLOPs per token is wrong; reporting 100%",
                      RuntimeWarning, stacklevel=2)
    return min(value, 1.0)
