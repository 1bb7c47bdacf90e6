"""The GPT model: one class that covers GPT-2, LLaMA-style and mixture-of-experts variants via ModelConfig.

Layout for pipeline parallelism (as in TorchTitan): a stage is this same class with parts set to None.
`wte is None` means the input is already hidden states; `lm_head is None` means the output is hidden states.
Layers live in a ModuleDict keyed "0".."n_layer-1", so deleting some keeps the others' parameter names.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import checkpoint

from gpt.config.model import ModelConfig
from gpt.model.attention import allowed
from gpt.errors import ConfigError

Rope = tuple[Tensor, Tensor]  # (cos, sin), each (T, head_dim // 2), for the positions being processed


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    # The norm's bias follows the norm choice, not cfg.bias (which governs the linear layers).
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.norm == "layernorm")


def llama3_frequencies(inv_freq: Tensor, cfg: ModelConfig) -> Tensor:
    """Llama 3.1's RoPE scaling: frequencies whose wavelength is over rope_original_context / rope_low_freq_factor
    turn rope_factor times slower, those under rope_original_context / rope_high_freq_factor are kept, and those
    between are interpolated smoothly from one to the other."""
    wavelength = 2 * math.pi / inv_freq
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    kept = ((cfg.rope_original_context / wavelength - low) / (high - low)).clamp(0, 1)  # 0: slowed, 1: kept
    return (1 - kept) * inv_freq / cfg.rope_factor + kept * inv_freq


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (cos and sin of position * frequency) for positions 0..block_size-1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.head_dim, self.max_len = cfg, cfg.head_dim, cfg.block_size
        # Non-persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("cos", torch.empty(self.max_len, self.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(self.max_len, self.head_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute the tables; needed after a model built on the meta device is materialised."""
        device = self.cos.device
        inv_freq = self.cfg.rope_base ** -(torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
                                           / self.head_dim)
        if self.cfg.rope_scaling == "llama3":
            inv_freq = llama3_frequencies(inv_freq, self.cfg)
        angles = torch.outer(torch.arange(self.max_len, device=device, dtype=torch.float32), inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, start: int, length: int) -> Rope:
        return self.cos[start:start + length], self.sin[start:start + length]


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate pairs (x[i], x[i + head_dim/2]) of x (B, heads, T, head_dim): the GPT-NeoX/LLaMA (HF) layout."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of the positions seen so far, for generation.

    Each layer's buffers are allocated at full length `max_len` on first use, with the dtype and device of its
    keys. `pos` is the number of positions filled; GPT.forward advances it after all layers have run.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.pos = 0
        self.kv: dict[str, tuple[Tensor, Tensor]] = {}

    def update(self, layer: str, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, kv_heads, T, head_dim) at positions pos..pos+T-1; return all keys and values so far."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} needed")
        if layer not in self.kv:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.kv[layer] = (k.new_empty(shape), v.new_empty(shape))
        cache_k, cache_v = self.kv[layer]
        cache_k[:, :, self.pos:end] = k
        cache_v[:, :, self.pos:end] = v
        return cache_k[:, :, :end], cache_v[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head, grouped-query or multi-query attention (n_query_groups = n_head, between, or 1)."""

    def __init__(self, cfg: ModelConfig, layer_id: str):
        super().__init__()
        self.layer_id = layer_id  # this layer's key in a KVCache
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # Separate q, k, v (not one fused qkv) so tensor parallelism can shard each by heads.
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        # The SDPA kernels this layer may use (train.attention, set by the trainer); None: SDPA chooses.
        self.kernels: list[SDPBackend] | None = None
        self.fused_qkv = False  # train.fused_qkv, set by the trainer

    def forward(self, x: Tensor, rope: Rope | None = None, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        # Heads counted from the projections' width: under tensor parallelism a rank holds only its own heads.
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in self.project_qkv(x))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # the cache keeps the n_kv_head heads, not the repeats
        S = k.size(2)  # key length: T, or more when earlier positions come from the cache
        # SDPA's is_causal aligns the mask top-left, which is wrong when S > T; give the bottom-right mask then.
        mask = None if T in (1, S) else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        # `True if ... else False`, a branch: compiled for a second sequence length T is symbolic, `T > 1` a SymBool
        # that SDPA refuses, and only a branch makes torch.compile decide it (a guard)
        causal = True if mask is None and T > 1 else False
        # enable_gqa: query head h attends with key/value head h // (n_head / n_kv_head), as in LLaMA, without
        # materialising the repeated keys and values.
        with allowed(self.kernels):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and v: one matmul of the three weights side by side when fused (a wider GEMM, one launch, and the
        backward's input gradient in one), else each its own."""
        layers = (self.q_proj, self.k_proj, self.v_proj)
        if not self.fused_qkv:
            return tuple(layer(x) for layer in layers)
        weight = torch.cat([layer.weight for layer in layers])
        bias = torch.cat([layer.bias for layer in layers]) if self.q_proj.bias is not None else None
        return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)


class MLP(nn.Module):
    """Two-matrix feed-forward with a GELU (exact, or its tanh approximation as OpenAI's GPT-2), ReLU or SiLU in
    between."""

    ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU, "silu": nn.SiLU}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.act = self.ACTIVATIONS[cfg.mlp]()
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward of LLaMA: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def make_mlp(cfg: ModelConfig) -> nn.Module:
    return SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)


class MoE(nn.Module):
    """Mixture of experts: each token goes to its top-k experts, weighted by the router's softmax renormalised
    over those k. `aux_loss` holds the Switch Transformer load-balancing loss of the last forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.router = nn.Linear(cfg.n_embd, cfg.n_expert, bias=False)
        self.experts = nn.ModuleList(make_mlp(cfg) for _ in range(cfg.n_expert))
        self.aux_loss: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        # (N, n_expert), in at least float32 for a stable softmax under bf16 autocast
        probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        # The N*k assignments sorted by expert (stable: tokens keep their order), cut by one host read of the
        # counts per layer rather than one per expert (scatter_add_, unlike bincount, does not read the device
        # to size its result). An expert with no tokens still runs (on zero rows) so every parameter gets a
        # gradient, which DDP requires.
        flat = chosen.flatten()
        order = flat.argsort(stable=True)
        token, slot = order // self.top_k, order % self.top_k
        counts = torch.zeros(len(self.experts), dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        parts = [expert(rows) for expert, rows in zip(self.experts, x[token].split(counts.tolist()))]
        out = torch.zeros_like(x).index_add_(0, token, torch.cat(parts) * weights[token, slot, None])
        # f_e: share of the N*k assignments that went to expert e (not differentiable); P_e: mean router
        # probability of e. n_expert * sum(f * P) is 1 when routing is uniform and grows as it concentrates.
        n_expert = probs.size(-1)
        f = counts.to(probs.dtype) / flat.numel()
        self.aux_loss = n_expert * (f * probs.mean(dim=0)).sum()
        return out.view(shape)


class Block(nn.Module):
    """One transformer layer: attention then MLP (or MoE), each a residual branch with its own norm."""

    def __init__(self, cfg: ModelConfig, layer_id: str):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_id)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.n_expert else make_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)  # residual dropout, on each branch's output
        # Activation checkpointing: keep only the block's input and recompute the rest in backward. A flag, not a
        # wrapper, so parameter names, copies of the model (pipeline stages) and hooks on the block (FSDP,
        # tensor parallel) stay as they are: hooks run once around the call, the recomputation inside.
        self.recompute = False

    def forward(self, x: Tensor, rope: Rope | None = None, cache: KVCache | None = None) -> Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self.layer, x, rope, cache, use_reentrant=False)
        return self.layer(x, rope, cache)

    def layer(self, x: Tensor, rope: Rope | None = None, cache: KVCache | None = None) -> Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.attn_norm(x), rope, cache))
            return x + self.drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, rope, cache)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size", None, "a positive integer; set it from the tokenizer first")
        self.cfg = cfg
        self.wte: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe: nn.Embedding | None = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.rope = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg, str(i)) for i in range(cfg.n_layer)})
        # Post-norm layers end in a norm already; pre-norm needs one before the head.
        self.ln_f: nn.Module | None = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.lm_head: nn.Linear | None = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # The residual stream's dtype from the embeddings on (train.residual_dtype, set by the trainer); None: the
        # embeddings' (fp32 under autocast, each block's bf16 output added to it in fp32)
        self.residual_dtype: torch.dtype | None = None
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Share wte's weight with lm_head if cfg.tie_embeddings (and this model holds both)."""
        if self.cfg.tie_embeddings and self.wte is not None and self.lm_head is not None:
            self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, residual output projections scaled by
        1/sqrt(2 * n_layer) since each layer adds two of them to the residual stream. Call again after
        materialising a model built on the meta device: it also recomputes the RoPE tables and re-ties the
        embeddings, which to_empty() unties."""
        self.tie_weights()
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for block in self.layers.values():
            experts = block.mlp.experts if isinstance(block.mlp, MoE) else [block.mlp]
            out_projs = [block.attn.o_proj] + [e.down if isinstance(e, SwiGLU) else e.proj for e in experts]
            for proj in out_projs:
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))
        if self.rope is not None:
            self.rope.reset_buffers()

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None, *,
                with_aux: bool = True) -> tuple[Tensor, Tensor | None]:
        """idx: token ids (B, T), or hidden states (B, T, n_embd) when wte is None.

        Returns (logits (B, T, vocab) for every position, or hidden states when lm_head is None; loss or None).
        The loss is the cross-entropy over targets != -1 plus, with `with_aux` (training: what is optimized),
        moe_aux_loss_weight times the MoE aux losses. Evaluation passes with_aux=False: a validation loss or
        perplexity is the cross-entropy alone, comparable with dense models' and with transformers' Mixtral.
        """
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} positions is longer than block_size={self.cfg.block_size}")
        x = idx
        if self.wte is not None:
            x = self.wte(idx)
            if self.wpe is not None:
                x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
            x = self.drop(x)
            if self.residual_dtype is not None:
                x = x.to(self.residual_dtype)
        rope = self.rope(start, T) if self.rope is not None else None
        for block in self.layers.values():
            x = block(x, rope, cache)
            if self.residual_dtype is not None:  # a no-op where the block kept it; an output promoted to fp32 (an
                x = x.to(self.residual_dtype)  # MoE's routing weights out of autocast's fp32 softmax) goes back
        if cache is not None:
            cache.pos += T
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.lm_head is None:
            return x, None
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
            if self.cfg.n_expert and with_aux:
                loss = loss + self.cfg.moe_aux_loss_weight * self.aux_loss()
        return logits, loss

    def aux_loss(self) -> Tensor:
        """Sum of the MoE load-balancing losses of the last forward (0 for a dense model)."""
        losses = [b.mlp.aux_loss for b in self.layers.values() if isinstance(b.mlp, MoE) and b.mlp.aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor counted once. non_embedding subtracts wte and wpe; an untied lm_head
        then still counts (it is a matmul per token), a tied one does not (it is wte)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(e.weight.numel() for e in (self.wte, self.wpe) if e is not None)
        return n

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True) -> Tensor:
        """Sample max_new_tokens tokens after idx (B, T); temperature 0 takes the likeliest each time (greedy). With
        the cache, prompt + new tokens must fit in block_size; without it, the context is cropped to the last
        block_size tokens (slower, no limit)."""
        cache = None
        if use_cache:
            if idx.size(1) + max_new_tokens > self.cfg.block_size:
                raise ValueError(f"{idx.size(1)} prompt + {max_new_tokens} new tokens exceed block_size="
                                 f"{self.cfg.block_size}; generate with use_cache=False to slide the context")
            cache = KVCache(self.cfg.block_size)
        for _ in range(max_new_tokens):
            if cache is None:
                context = idx[:, -self.cfg.block_size:]
            else:
                context = idx[:, cache.pos:]  # the whole prompt first, then one new token per step
            logits, _ = self(context, cache=cache)
            next_token = self._next_token(logits[:, -1, :], temperature, top_k)
            idx = torch.cat((idx, next_token), dim=1)
        return idx

    @staticmethod
    def _next_token(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
