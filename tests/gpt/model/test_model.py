"""The GPT model: shapes for every preset and component, gradients, causality, determinism, KV cache, layout."""
import copy
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.func import functional_call

from gpt.config.model import MLPS, NORMS, POSITIONS, ModelConfig, load_preset
from gpt.config.parse import section
from gpt.errors import ConfigError
from gpt.model.transformer import GPT, MLP, CausalSelfAttention, KVCache, MoE, RotaryEmbedding, SwiGLU, apply_rope, make_norm

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[3] / "configs" / "model").glob("*.yaml"))
TOKENIZER_VOCAB = 65  # stands in for the tokenizer's vocabulary where a preset leaves vocab_size null


def tiny(**overrides) -> ModelConfig:
    base = dict(name="test", n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=29)
    cfg = ModelConfig(**{**base, **overrides})
    cfg.validate()
    return cfg


# Component variations beyond the norm x position x mlp grid.
VARIANTS = {
    "gqa": dict(n_query_groups=2),
    "mqa": dict(n_query_groups=1),
    "moe": dict(n_expert=4, moe_top_k=2),
    "moe_swiglu_gqa_rope": dict(n_expert=3, moe_top_k=1, mlp="swiglu", n_query_groups=2, position="rope"),
    "untied": dict(tie_embeddings=False),
    "post_norm": dict(norm_position="post"),
    "no_bias": dict(bias=False),
    "dropout": dict(dropout=0.1),
}


def preset(name: str) -> ModelConfig:
    cfg = load_preset(name)
    return cfg if cfg.vocab_size else dataclasses.replace(cfg, vocab_size=TOKENIZER_VOCAB)


def seeded_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def tokens(cfg: ModelConfig, B: int = 2, T: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T or cfg.block_size), generator=g)


# --- presets -----------------------------------------------------------------------------------------------


def test_all_presets_are_covered():
    assert {"gpt2_124m", "llama_124m", "moe_small", "tiny"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.slow
def test_preset_output_shapes(name):
    cfg = preset(name)
    with torch.device("meta"):  # full-size presets, without allocating or initialising their weights
        model = GPT(cfg)
    device = "meta"
    if cfg.n_expert:  # MoE routing has data-dependent shapes, which the meta device cannot run
        device = "cpu"
        model.to_empty(device=device)
    idx = torch.zeros(2, 8, dtype=torch.long, device=device)
    with torch.no_grad():
        logits, loss = model(idx, idx)
    assert logits.shape == (2, 8, cfg.vocab_size)
    assert loss.shape == ()
    assert isinstance(model.layers, nn.ModuleDict) and list(model.layers) == [str(i) for i in range(cfg.n_layer)]
    assert (model.lm_head.weight is model.wte.weight) == cfg.tie_embeddings


@pytest.mark.parametrize("name", ["gpt2_1.5b", "llama_1b", "moe_small", "shakespeare_char"])
def test_load_preset_matches_hydra_compose(name):
    from hydra import compose, initialize_config_dir

    configs = Path(__file__).resolve().parents[3] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        composed = compose(overrides=[f"+model={name}"])
    assert section(ModelConfig, "model", OmegaConf.to_container(composed.model)) == load_preset(name)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="gpt2_124m"):
        load_preset("gpt5")


# --- shapes and gradients for every component choice --------------------------------------------------------


def check_forward_backward(cfg: ModelConfig) -> None:
    model = seeded_model(cfg)
    idx = tokens(cfg)
    logits, loss = model(idx, idx)
    assert logits.shape == (2, cfg.block_size, cfg.vocab_size)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("norm,position,mlp", list(itertools.product(NORMS, POSITIONS, MLPS)))
def test_component_grid_shapes(norm, position, mlp):
    check_forward_backward(tiny(norm=norm, position=position, mlp=mlp))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_shapes(variant):
    check_forward_backward(tiny(**VARIANTS[variant]))


def test_layout_per_config():
    learned = GPT(tiny(norm="layernorm_nobias"))
    assert learned.wpe is not None and learned.rope is None and learned.ln_f is not None
    assert learned.ln_f.bias is None
    rope = GPT(tiny(position="rope", norm="rmsnorm", norm_position="post", tie_embeddings=False))
    assert rope.wpe is None and rope.rope is not None and rope.ln_f is None
    assert isinstance(rope.layers["0"].attn_norm, nn.RMSNorm)
    assert rope.lm_head.weight is not rope.wte.weight
    assert "rope.cos" not in rope.state_dict()  # derived from the config, not checkpointed
    gqa = GPT(tiny(n_query_groups=2)).layers["0"].attn
    assert (gqa.q_proj.out_features, gqa.k_proj.out_features, gqa.v_proj.out_features) == (32, 16, 16)
    moe = GPT(tiny(n_expert=3)).layers["1"].mlp
    assert isinstance(moe, MoE) and len(moe.experts) == 3 and isinstance(moe.experts[0], MLP)


def test_grouped_query_heads_share_consecutive_kv_heads():
    # Query head h reads key/value head h // (n_head / n_kv_head), as LLaMA does; tensor parallelism relies on
    # it to give each rank a contiguous block of q heads together with the kv heads they need.
    cfg = tiny(n_head=4, n_query_groups=2, n_embd=8, bias=False)
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg, "0")
    nn.init.eye_(attn.o_proj.weight.data)  # output channels = the heads' outputs, 2 per head
    x = torch.randn(1, 5, 8)
    q, k, v = (proj(x)[0].view(5, -1, 2).transpose(0, 1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    expected = []
    for h in range(4):
        scores = (q[h] @ k[h // 2].T / 2 ** 0.5).masked_fill(~causal, float("-inf"))
        expected.append(scores.softmax(dim=-1) @ v[h // 2])
    torch.testing.assert_close(attn(x)[0], torch.cat(expected, dim=-1))


def test_init_scales_residual_projections():
    cfg = tiny(n_layer=8, n_embd=256, n_head=4, mlp="swiglu", bias=True, vocab_size=512)
    model = seeded_model(cfg)
    block = model.layers["3"]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert block.mlp.down.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert block.mlp.gate.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(block.attn.q_proj.bias) == 0
    assert torch.equal(block.attn_norm.weight, torch.ones(256))


def test_num_parameters():
    tied = GPT(tiny())
    C, V, T = 32, 29, 16
    assert tied.num_parameters() == sum(p.numel() for p in set(tied.parameters()))
    assert tied.num_parameters() - tied.num_parameters(non_embedding=True) == V * C + T * C
    untied = GPT(tiny(tie_embeddings=False, position="rope"))
    assert untied.num_parameters() - tied.num_parameters() == V * C - T * C
    assert untied.num_parameters() - untied.num_parameters(non_embedding=True) == V * C


# --- gradcheck in float64 -----------------------------------------------------------------------------------


def gradcheck(fn, *inputs, fast_mode=False):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast_mode)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("groups", [None, 2, 1])
def test_gradcheck_attention(position, groups):
    cfg = tiny(position=position, n_query_groups=groups, n_embd=8, n_head=4)
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg, "0").double()
    rope = RotaryEmbedding(dataclasses.replace(cfg, block_size=8))(2, 4) if position == "rope" else None
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    gradcheck(lambda x: attn(x, rope), x)
    # And the weights' gradients, through q/k/v/o (fast mode: a random projection of the Jacobian).
    names = [n for n, _ in attn.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for p in attn.parameters()]
    gradcheck(lambda *w: functional_call(attn, dict(zip(names, w)), (x.detach(), rope)), *weights, fast_mode=True)


@pytest.mark.parametrize("mlp", MLPS)
def test_gradcheck_mlp(mlp):
    cfg = tiny(mlp=mlp, n_embd=8, mlp_multiple_of=8)
    torch.manual_seed(0)
    module = (SwiGLU(cfg) if mlp == "swiglu" else MLP(cfg)).double()
    gradcheck(module, torch.randn(3, 8, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_norm(norm):
    torch.manual_seed(0)
    module = make_norm(tiny(norm=norm, n_embd=8, n_head=2)).double()
    nn.init.normal_(module.weight)
    gradcheck(module, torch.randn(3, 8, dtype=torch.float64, requires_grad=True))


def test_gradcheck_rope():
    rope = RotaryEmbedding(tiny(position="rope", n_embd=8, n_head=1, block_size=16))
    gradcheck(lambda x: apply_rope(x, rope(3, 5)), torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True))


def test_rope_rotates_relative_positions():
    # <rope(q, m), rope(k, n)> depends only on m - n: the property that makes it a relative position code.
    rope = RotaryEmbedding(tiny(position="rope", n_embd=8, n_head=1, block_size=32))
    q, k = torch.randn(2, 8, dtype=torch.float64)
    def score(m, n):
        return (apply_rope(q.view(1, 1, 1, 8), rope(m, 1)) * apply_rope(k.view(1, 1, 1, 8), rope(n, 1))).sum()
    assert score(7, 3).item() == pytest.approx(score(20, 16).item(), rel=1e-5)
    assert score(7, 3).item() != pytest.approx(score(7, 4).item(), rel=1e-3)


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradcheck_moe_router(top_k):
    cfg = tiny(n_expert=4, moe_top_k=top_k, n_embd=8, n_head=2, mlp="silu")
    torch.manual_seed(0)
    moe = MoE(cfg).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    router = moe.router.weight.detach().clone()
    # Precondition: no near-tie between the k-th and the next expert, so eps-steps never flip the routing.
    probs = torch.softmax(x.view(-1, 8) @ router.T, dim=-1).sort(dim=-1, descending=True).values
    assert (probs[:, top_k - 1] - probs[:, top_k]).min() > 1e-4

    def f(x, router):
        out = functional_call(moe, {"router.weight": router}, (x,))
        return out, moe.aux_loss

    gradcheck(f, x.requires_grad_(), router.requires_grad_())


def test_moe_aux_loss_is_one_for_uniform_routing_and_grows_when_skewed():
    cfg = tiny(n_expert=4, moe_top_k=1, n_embd=8, n_head=2)
    moe = MoE(cfg)
    nn.init.zeros_(moe.router.weight)  # equal probabilities; topk then picks expert 0 for all: f = (1,0,0,0)
    moe(torch.randn(4, 8))
    assert moe.aux_loss.item() == pytest.approx(1.0)  # 4 * (1 * 1/4)
    with torch.no_grad():
        moe.router.weight[0] = 10.0  # every token to expert 0, with probability ~1
    moe(torch.ones(4, 8))
    assert moe.aux_loss.item() == pytest.approx(4.0, rel=1e-3)


def test_moe_output_is_weighted_sum_of_top_k_experts():
    cfg = tiny(n_expert=3, moe_top_k=2, n_embd=8, n_head=2)
    torch.manual_seed(0)
    moe = MoE(cfg)
    x = torch.randn(5, 8)
    probs = torch.softmax(moe.router(x), dim=-1)
    expected = torch.zeros_like(x)
    for t in range(5):
        w, e = probs[t].topk(2)
        for wi, ei in zip(w / w.sum(), e):
            expected[t] += wi * moe.experts[int(ei)](x[t])
    torch.testing.assert_close(moe(x), expected)


def test_moe_training_loss_adds_weighted_aux_loss_and_evaluation_loss_is_the_cross_entropy():
    cfg = tiny(n_expert=4, moe_aux_loss_weight=0.5)
    model = seeded_model(cfg)
    idx = tokens(cfg)
    logits, loss = model(idx, idx)
    ce = nn.functional.cross_entropy(logits.view(-1, cfg.vocab_size), idx.view(-1))
    aux = sum(b.mlp.aux_loss for b in model.layers.values())
    assert aux.item() >= 2.0 - 1e-6  # each layer's aux loss is at least 1
    torch.testing.assert_close(loss, ce + 0.5 * aux)
    torch.testing.assert_close(model.aux_loss(), aux)
    _, evaluated = model(idx, idx, with_aux=False)
    torch.testing.assert_close(evaluated, ce)


def test_loss_ignores_minus_one_targets():
    cfg = tiny()
    model = seeded_model(cfg)
    idx = tokens(cfg)
    targets = idx.clone()
    targets[:, ::2] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits[keep], targets[keep]))


# --- causality, determinism ---------------------------------------------------------------------------------

CAUSAL_CASES = {f"position={p}": dict(position=p) for p in POSITIONS} | {
    "gqa": dict(n_query_groups=2, position="rope"),
    "mqa": dict(n_query_groups=1),
    "moe": dict(n_expert=4, moe_top_k=2),
    "post_norm": dict(norm_position="post"),
}


@pytest.mark.parametrize("case", sorted(CAUSAL_CASES))
def test_future_tokens_never_change_earlier_logits(case):
    cfg = tiny(**CAUSAL_CASES[case])
    model = seeded_model(cfg).eval()
    idx = tokens(cfg)
    logits, _ = model(idx)
    for cut in (1, 7, cfg.block_size - 1):
        changed = idx.clone()
        changed[:, cut:] = (changed[:, cut:] + 1 + torch.arange(cfg.block_size - cut)) % cfg.vocab_size
        new_logits, _ = model(changed)
        torch.testing.assert_close(new_logits[:, :cut], logits[:, :cut], rtol=0, atol=1e-5)
        assert not torch.allclose(new_logits[:, cut:], logits[:, cut:])


def train_losses(cfg: ModelConfig, seed: int, steps: int = 3) -> list[float]:
    model = seeded_model(cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = tokens(cfg, seed=seed)
    losses = []
    for _ in range(steps):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_same_seed_same_losses():
    cfg = tiny(dropout=0.1, n_expert=2, moe_top_k=1)
    first = train_losses(cfg, seed=3)
    assert train_losses(cfg, seed=3) == first
    assert train_losses(cfg, seed=4) != first
    assert first[-1] < first[0]  # and it learns


# --- generation and the KV cache ----------------------------------------------------------------------------

CACHE_CASES = {"learned": dict(position="learned"), "rope": dict(position="rope"),
               "gqa_rope": dict(position="rope", n_query_groups=2), "mqa_none": dict(position="none", n_query_groups=1),
               "moe": dict(n_expert=3, moe_top_k=2, position="rope")}


@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_cached_steps_match_full_forward(case):
    cfg = tiny(**CACHE_CASES[case])
    model = seeded_model(cfg).eval()
    idx = tokens(cfg)
    full, _ = model(idx)
    cache = KVCache(cfg.block_size)
    # A 5-token prefill, a 4-token chunk (the chunk attends to the cache through a bottom-right causal mask),
    # then one token at a time.
    pieces = [(0, 5), (5, 9)] + [(t, t + 1) for t in range(9, cfg.block_size)]
    stepped = torch.cat([model(idx[:, a:b], cache=cache)[0] for a, b in pieces], dim=1)
    assert cache.pos == cfg.block_size
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_greedy_generation_same_with_and_without_cache(case):
    cfg = tiny(**CACHE_CASES[case])
    model = seeded_model(cfg).eval()
    prompt = tokens(cfg, T=4)
    cached = model.generate(prompt, max_new_tokens=12, top_k=1)
    uncached = model.generate(prompt, max_new_tokens=12, top_k=1, use_cache=False)
    assert cached.shape == (2, 16)
    assert torch.equal(cached[:, :4], prompt)
    assert torch.equal(cached, uncached)


def test_generation_past_block_size():
    cfg = tiny()
    model = seeded_model(cfg).eval()
    prompt = tokens(cfg, T=10)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(prompt, max_new_tokens=10)
    assert model.generate(prompt, max_new_tokens=10, use_cache=False).shape == (2, 20)
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(cfg, T=17))


def test_temperature_0_is_greedy():
    cfg = tiny()
    model = seeded_model(cfg).eval()
    prompt = tokens(cfg, T=3)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=0), model.generate(prompt, 6, top_k=1))


def test_sampling_respects_top_k():
    cfg = tiny()
    model = seeded_model(cfg).eval()
    prompt = tokens(cfg, T=3)
    allowed = model(prompt)[0][:, -1].topk(3).indices
    torch.manual_seed(0)
    out = model.generate(prompt, max_new_tokens=1, temperature=5.0, top_k=3)
    assert all(out[b, -1] in allowed[b] for b in range(2))


# --- layout for pipeline stages and meta-device construction ------------------------------------------------


@pytest.mark.parametrize("variant", ["learned", "rope_untied_gqa"])
def test_pipeline_stages_compose_to_the_full_model(variant):
    overrides = dict(n_layer=3) | ({} if variant == "learned" else
                                   dict(position="rope", tie_embeddings=False, n_query_groups=2))
    cfg = tiny(**overrides)
    model = seeded_model(cfg).eval()
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["2"]
    first.ln_f, first.lm_head = None, None
    del last.layers["0"], last.layers["1"]
    last.wte, last.wpe = None, None
    assert set(first.state_dict()) | set(last.state_dict()) == set(model.state_dict())  # names kept
    idx = tokens(cfg)
    hidden, no_loss = first(idx, idx)
    assert hidden.shape == (2, cfg.block_size, cfg.n_embd) and no_loss is None
    logits, loss = last(hidden, idx)
    full_logits, full_loss = model(idx, idx)
    torch.testing.assert_close(logits, full_logits)
    torch.testing.assert_close(loss, full_loss)


def test_meta_model_materialised_and_reinitialised_equals_a_fresh_one():
    cfg = tiny(position="rope")
    with torch.device("meta"):
        meta = GPT(cfg)
    meta.to_empty(device="cpu")  # parameters and the RoPE tables now hold garbage
    fresh = GPT(cfg)
    for model in (meta, fresh):
        torch.manual_seed(0)
        model.init_weights()
    torch.testing.assert_close(meta.rope.cos, fresh.rope.cos)
    torch.testing.assert_close(meta.rope.sin, fresh.rope.sin)
    torch.testing.assert_close(meta.state_dict(), fresh.state_dict())
    assert meta.lm_head.weight is meta.wte.weight
    idx = tokens(cfg)
    torch.testing.assert_close(meta(idx)[0], fresh(idx)[0])


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,key,valid", [
    (dict(n_embd=30, n_head=4), "model.n_embd", "multiple of model.n_head=4"),
    (dict(n_head=4, n_query_groups=3), "model.n_query_groups", "divisor of model.n_head=4"),
    (dict(norm="batchnorm"), "model.norm", "layernorm, layernorm_nobias, rmsnorm"),
    (dict(position="alibi"), "model.position", "learned, rope, none"),
    (dict(mlp="geglu"), "model.mlp", "gelu, gelu_tanh, relu, silu, swiglu"),
    (dict(vocab_size=None), "model.vocab_size", "tokenizer"),
])
def test_bad_config_names_key_and_valid_values(overrides, key, valid):
    cfg = ModelConfig(**(dict(n_layer=1, n_head=4, n_embd=32, block_size=8, vocab_size=11) | overrides))
    with pytest.raises(ConfigError) as err:
        GPT(cfg)  # built directly, not from the config: the model validates too
    assert err.value.key == key
    assert key in str(err.value) and valid in str(err.value)
    if overrides.get("vocab_size", 1) is not None:
        with pytest.raises(ConfigError, match=key):
            section(ModelConfig, "model", dataclasses.asdict(cfg))


def test_activation_checkpointing_recomputes_the_chosen_layers_with_the_same_gradients():
    """A block with `recompute` runs its layer again in backward (twice in all) and keeps its gradients; the
    others run once. train.activation_checkpointing=every_2 picks layers 0, 2, ..."""
    from gpt.config.train import TrainConfig

    cfg = ModelConfig(name="t", n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=50)
    torch.manual_seed(0)
    plain, recomputed = GPT(cfg), GPT(cfg)
    recomputed.load_state_dict(plain.state_dict())
    every = TrainConfig(activation_checkpointing="every_2").recompute_every()
    calls = {key: 0 for key in recomputed.layers}
    for i, (key, block) in enumerate(recomputed.layers.items()):
        block.recompute = i % every == 0
        original = block.layer

        def counted(*args, key=key, original=original):
            calls[key] += 1
            return original(*args)

        block.layer = counted
    idx = torch.randint(0, 50, (2, 16))
    for model in (plain, recomputed):
        model(idx, idx)[1].backward()
    assert calls == {"0": 2, "1": 1, "2": 2, "3": 1}
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
