"""AdamW as every strategy builds it: fused where torch has the kernel (the CPU too, so CPU runs take the GPU's
path), and parameter groups a fused kernel accepts when tensor parallelism leaves some parameters plain."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from gpt.config.model import ModelConfig
from gpt.model.transformer import GPT
from gpt.parallel.tensor import apply_tensor_parallel
from gpt.train.optim import build_adamw

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)


@pytest.fixture
def one_rank_group():
    """A one-rank group: the one an in-process trainer of an earlier test left (gpt.parallel.mesh keeps it for the
    process), else one made here and removed after."""
    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.get_world_size() == 1
    yield
    if made:
        dist.destroy_process_group()


def test_cpu_adamw_is_fused():
    optimizer = build_adamw(GPT(TINY), 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    assert all(group["fused"] for group in optimizer.param_groups)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]


def test_fused_step_on_a_tensor_parallel_stage_left_unwrapped(one_rank_group):
    """A pipeline stage under tp with one data-parallel replica: its linear layers are DTensors, its norms and
    learned positions plain tensors; one fused kernel call refuses the mix, so they are grouped apart."""
    torch.manual_seed(0)
    model = apply_tensor_parallel(GPT(TINY), init_device_mesh("cpu", (1,), mesh_dim_names=("tp",)),
                                  sequence_parallel=False, sharded_loss=False)
    kinds = {isinstance(p, DTensor) for p in model.parameters()}
    assert kinds == {True, False}  # the mix that fused AdamW refuses in one group
    optimizer = build_adamw(model, 1e-2, 0.1, (0.9, 0.95), torch.device("cpu"))
    for group in optimizer.param_groups:
        assert group["fused"] and len({isinstance(p, DTensor) for p in group["params"]}) == 1
    x = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))
    before = [p.detach().clone() for p in model.parameters()]
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
