"""Tensor parallelism, Megatron-style, with DTensor (`torch.distributed.tensor.parallel`) on the "tp" mesh axis.

- Attention: q, k, v column-parallel (each rank computes whole heads, and whole query groups under GQA), the
  output projection row-parallel. The MLP: its input matrices (fc, or gate and up) column-parallel, its output
  matrix row-parallel. Each block then costs one all-reduce of activations in attention and one in the MLP.
- The token embedding is split over the vocabulary (row-parallel), the output head over the vocabulary too
  (column-parallel), and the loss is computed on vocabulary-sharded logits (`loss_parallel`): the full logits
  are never gathered. A tied head keeps sharing the embedding's (identically sharded) weight.
- Sequence parallel: norms, dropout and residuals run on a slice of the sequence; the all-reduces become an
  all-gather before attention and the MLP and a reduce-scatter after them.
"""
from __future__ import annotations

from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from gpt.model.transformer import GPT, SwiGLU


def block_plan(block: nn.Module, sequence_parallel: bool) -> dict:
    """The plan of one transformer block (attention, then a dense MLP or SwiGLU)."""
    between = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout between modules
    plan = {
        "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=between),
    }
    if isinstance(block.mlp, SwiGLU):
        plan.update({"mlp.gate": ColwiseParallel(), "mlp.up": ColwiseParallel(),
                     "mlp.down": RowwiseParallel(output_layouts=between)})
    else:
        plan.update({"mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(output_layouts=between)})
    if sequence_parallel:
        # attn(x, rope, cache) and mlp(x): gather the sequence before them; norms work on the local slice
        plan.update({"attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel(),
                     "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                desired_input_layouts=(Replicate(), None, None)),
                     "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))})
    return plan


def wait_for_embedding(module: nn.Module, args: tuple, output):
    """The embedding's output, its all-reduce waited for: RowwiseParallel returns an AsyncCollectiveTensor (the
    all-reduce still in flight). Fed as it is to a compiled block (train.compile), AOT autograd (torch 2.13)
    replaces it by its waited value cut off from autograd, so no gradient would reach the embedding through the
    blocks. wait_tensor is differentiable (identity backward) and copies nothing; the first block needs the value
    at once anyway."""
    return wait_tensor(output) if isinstance(output, AsyncCollectiveTensor) else output


def apply_tensor_parallel(model: GPT, mesh: DeviceMesh, sequence_parallel: bool, sharded_loss: bool = True) -> GPT:
    """Split `model` (in place; a whole GPT or a pipeline stage of one) over the 1-D `mesh`. With `sharded_loss`
    forward returns vocabulary-sharded logits (a DTensor), whose loss must be computed under
    `torch.distributed.tensor.parallel.loss_parallel()`; else the logits are gathered."""
    between = Shard(1) if sequence_parallel else Replicate()
    if model.wte is not None:
        # The embedding's output is complete (an all-reduce over the vocabulary shards), so learned positions add
        # to it as they are; under sequence parallel the first block then takes its slice (no communication).
        parallelize_module(model, mesh, {"wte": RowwiseParallel(input_layouts=Replicate(),
                                                                output_layouts=Replicate())})
        model.wte.register_forward_hook(wait_for_embedding)  # after RowwiseParallel's own output hook
    for block in model.layers.values():
        parallelize_module(block, mesh, block_plan(block, sequence_parallel))
    if sequence_parallel:
        parallelize_module(next(iter(model.layers.values())), mesh, PrepareModuleInput(
            input_layouts=(Replicate(), None, None), desired_input_layouts=(Shard(1), None, None),
            use_local_output=True))
    if model.lm_head is not None:
        logits = Shard(-1) if sharded_loss else Replicate()
        head = {"lm_head": ColwiseParallel(input_layouts=between, output_layouts=logits,
                                           use_local_output=not sharded_loss)}
        if model.ln_f is not None and sequence_parallel:
            head["ln_f"] = SequenceParallel()
        parallelize_module(model, mesh, head)
    model.tie_weights()  # both were split over the vocabulary the same way: share the embedding's DTensor again
    return model
