"""The planner's memory estimate (gpt.parallel.memory_estimate) against what a strategy really holds, built as rank 0
of a larger world on torch's fake process group (its collectives do nothing): FSDP2's gradients between the
micro-steps of gradient accumulation."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from gpt.collectives.process_group import DistEnv
from gpt.config.model import ModelConfig
from gpt.config.strategy import StrategyConfig
from gpt.config.train import TrainConfig
from gpt.model.transformer import GPT
from gpt.parallel.fsdp import FSDP
from gpt.parallel.layout import ParallelDims
from gpt.parallel.memory_estimate import estimate

MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
RANKS, MICRO = 4, 2  # sequences per micro-batch


@pytest.fixture
def fake_world():
    """This process as rank 0 of RANKS."""
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=RANKS)
    yield
    dist.destroy_process_group()


def unsharded_gradients(model: torch.nn.Module) -> int:
    """Bytes of the gradients FSDP2 keeps unsharded for the next micro-step (torch 2.13's FSDPParam: an accumulated
    gradient in the reduce dtype, or the unsharded parameter's own)."""
    held = 0
    for module in (m for m in model.modules() if isinstance(m, FSDPModule)):
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for param in group.fsdp_params:
                grad = param.unsharded_accumulated_grad
                grad = grad if grad is not None else param._unsharded_param.grad
                held += grad.nbytes if grad is not None else 0
    return held


def sharded_gradients(model: torch.nn.Module) -> int:
    return sum(p.grad.to_local().nbytes for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp_gradient_accumulation_is_estimated_with_the_unsharded_fp32_gradients_it_holds(precision, fake_world):
    """Between micro-steps (the gradients' reduction off) FSDP2 holds each block's gradients unsharded, in fp32
    under bf16 too: RANKS times what it holds after the step, when each rank keeps its shard. The estimate of a run of
    4 micro-steps counts those, where it counted the shard."""
    dims, strategy = ParallelDims(dp_shard=RANKS), StrategyConfig(name="fsdp")
    fsdp = FSDP(strategy, DistEnv(rank=0, world_size=RANKS), torch.device("cpu"), precision, dims)
    fsdp.setup(GPT(MODEL), 1e-3, 0.1, (0.9, 0.95))
    x = torch.randint(0, MODEL.vocab_size, (MICRO, MODEL.block_size))
    for last in (False, True):  # the train loop's micro-steps (Strategy.train_step)
        with fsdp.sync_gradients(last):
            fsdp.model(x, x)[1].backward()
        if not last:
            between = unsharded_gradients(fsdp.model)
    after = sharded_gradients(fsdp.model)
    assert between == RANKS * after

    def estimated_grads(micro_steps: int) -> float:
        train = TrainConfig(global_batch_size=RANKS * MICRO * micro_steps, micro_batch_size=MICRO, precision=precision)
        return estimate(MODEL, train, strategy, dims, MICRO).grads

    assert estimated_grads(1) == pytest.approx(after, rel=0.01)
    assert estimated_grads(4) == pytest.approx(between, rel=0.01)  # today: the shard alone, RANKS times too little


def test_a_bf16_residual_stream_halves_what_the_norms_keep_per_token():
    """train.residual_dtype=bf16: the two norms' inputs a layer keeps are bf16, 2 x n_embd x 2 bytes a token fewer."""
    from gpt.parallel.memory_estimate import activation_bytes_per_token

    model = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    for compile_ in (False, True):
        fp32 = activation_bytes_per_token(model, TrainConfig(precision="bf16", compile=compile_))
        bf16 = activation_bytes_per_token(model, TrainConfig(precision="bf16", compile=compile_,
                                                             residual_dtype="bf16"))
        assert fp32[0] - bf16[0] == 2 * 768 * 2 and fp32[1] == bf16[1]


def held_with(strategy, fused: bool) -> float:
    """What one step of `strategy` saved for backward (activations, gathered weights left out), q, k and v fused or
    not."""
    from gpt.parallel.memory_held import MeasuredStep

    torch.manual_seed(0)
    model = GPT(MODEL)
    for block in model.layers.values():
        block.attn.fused_qkv = fused
    strategy.setup(model, 1e-3, 0.1, (0.9, 0.95))
    x = torch.randint(0, MODEL.vocab_size, (MICRO, MODEL.block_size))
    with MeasuredStep(strategy, 1) as step:
        strategy.train_step([(x, x)], 1, 1e-3, 1.0)
    return step.parts.activations


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_qkv_counts_the_joined_weight_each_layer_saves_where_autocast_makes_no_copy(precision, fake_world):
    """Joined, q, k and v's weight is a new tensor each layer's matmul saves for backward: FSDP gathers the weights in
    the compute dtype (no autocast copies to stand in for it), so each layer saves one more weight's worth."""
    dims, strategy = ParallelDims(dp_shard=RANKS), StrategyConfig(name="fsdp")
    env, device = DistEnv(rank=0, world_size=RANKS), torch.device("cpu")
    measured = [held_with(FSDP(strategy, env, device, precision, dims), fused) for fused in (False, True)]
    train = [TrainConfig(global_batch_size=RANKS * MICRO, micro_batch_size=MICRO, precision=precision, fused_qkv=f)
             for f in (False, True)]
    estimated = [estimate(MODEL, t, strategy, dims, MICRO).activations for t in train]
    joined = MODEL.n_layer * 3 * MODEL.n_embd ** 2 * (4 if precision == "fp32" else 2)
    assert measured[1] - measured[0] == joined  # fails where the saved join is not there to count
    assert estimated[1] - estimated[0] == joined


def test_a_checkpointed_layer_keeps_its_input_in_the_residual_streams_dtype():
    """Activation checkpointing keeps each checkpointed layer's input, the residual stream: bf16 under
    train.residual_dtype=bf16, half the fp32 stream's bytes."""
    model = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    kept = [estimate(model, TrainConfig(global_batch_size=8, precision="bf16", activation_checkpointing="full",
                                        residual_dtype=r), StrategyConfig(name="single"), ParallelDims(), 8).activations
            for r in ("fp32", "bf16")]
    # per token: 2 bytes fewer of each of the 12 layers' kept input, and of the recomputed layer's two norms' inputs
    assert kept[0] - kept[1] == 8 * 1024 * (12 + 2) * 768 * 2


def test_float8_all_gathers_are_estimated_at_a_byte_a_value_of_the_float8_layers():
    """train.fp8_all_gather: FSDP gathers the float8 layers' weights in float8, one layer at a time: a byte a value
    fewer than bf16's for each of a layer's float8 weights; the embeddings and head stay bf16."""
    from gpt.config.model import load_preset
    from gpt.model.float8 import float8_layers
    from gpt.model.shapes import parameter_shapes

    model, dims = load_preset("llama_1b"), ParallelDims(dp_shard=8)
    gathered = [estimate(model, TrainConfig(global_batch_size=64, micro_batch_size=8, precision="fp8", compile=True,
                                            fp8_all_gather=g), StrategyConfig(name="fsdp"), dims, 8).activations
                for g in (False, True)]
    shapes, layer0 = dict(parameter_shapes(model)), [n for n in float8_layers(model, "tensorwise") if ".0." in n]
    assert len(layer0) == 5  # q, o and the SwiGLU's three (k and v, 512 wide, too small to gain)
    assert gathered[0] - gathered[1] == sum(shapes[f"{n}.weight"][0] * shapes[f"{n}.weight"][1] for n in layer0)
