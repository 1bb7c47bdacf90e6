"""The memory each rank records after its first step (its "memory" metrics record, gpt.parallel.memory_held) holds
exactly the parameters, gradients and optimizer state of its layout, for every strategy and layout (the runs are
test_equivalence's, trained once per session). Summed over the ranks, each part is the model's parameters times the
copies the layout keeps of each, at the bytes per parameter the strategy's traits state (traits.state_bytes): the
whole model times the copies the strategy's shares say (traits.state_shares), a norm or row-parallel bias once per
tensor-parallel rank (not split), a tied embedding twice across pipeline stages (the last stage's head is a copy);
and the optimizer's 4-byte step count per tensor it steps (DeepSpeed ZeRO: one flat tensor per parameter group)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from gpt.config import schema
from gpt.model.transformer import GPT
from gpt.parallel import plan_layout
from gpt.parallel.memory_estimate import GIB, estimate
from gpt.parallel.tensor import block_plan
from gpt.parallel.traits import traits_of
from gpt.train.build import model_config
from gpt.train.optim import param_groups
from helpers import read_metrics
from strategy_runs import BF16_CASES, CASES, ranks, run

pytestmark = pytest.mark.slow  # each case trains its strategy through `python -m launch`

EXACT = ("params", "grads", "optimizer")


def tp_split(model: GPT, sequence_parallel: bool) -> set[str]:
    """The parameters tensor parallelism splits (gpt.parallel.tensor's plan): the embedding, the head, and the
    column- and row-parallel matrices with the column-parallel biases."""
    split = {"wte.weight", "lm_head.weight"}
    for prefix, block in model.layers.items():
        for path, style in block_plan(block, sequence_parallel).items():
            if not isinstance(style, ColwiseParallel | RowwiseParallel):
                continue  # sequence-parallel norms and input layouts: whole on each tp rank
            for name, _ in block.get_submodule(path).named_parameters():
                if name != "bias" or not isinstance(style, RowwiseParallel):
                    split.add(f"layers.{prefix}.{path}.{name}")
    return split


def exact_sums(run_dir: Path, world: int) -> dict[str, float]:
    """params, grads and optimizer bytes of all the ranks together, from the model and the layout alone."""
    run = schema.load(run_dir / "config.yaml")
    traits = traits_of(run.strategy.name)
    dims = traits.layout(run.strategy, run.parallel, world)
    with torch.device("meta"):
        model = GPT(model_config(run.model, Path(run.data.dir)))
    split = tp_split(model, dims.sequence_parallel) if dims.tp > 1 else set()
    tied = run.model.tie_embeddings and dims.pp > 1
    shares = traits.state_shares(run.strategy, dims)
    sizes = traits.state_bytes(run.strategy, run.train.precision)
    if run.strategy.name == "deepspeed":  # ZeRO-1 too reduces the whole gradients into its partition before the update
        shares = (shares[0], shares[2], shares[2])
    sums = dict.fromkeys(EXACT, 0.0)
    steps = 0.0  # AdamW's step counts: one per tensor on each rank whose optimizer steps it
    for name, p in model.named_parameters():
        copies = (1 if name in split else dims.tp) * (2 if tied and name == "wte.weight" else 1)
        for part, share, size in zip(EXACT, shares, sizes):
            sums[part] += size * p.numel() * copies * world * share
        steps += world / dims.pp * (2 if tied and name == "wte.weight" else 1)
    if run.strategy.name == "zero1":  # each tensor stepped by one rank of its replicas
        steps /= dims.dp
    if run.strategy.name == "deepspeed":  # a flat partition per parameter group on each rank
        steps = world * len(param_groups(model, 0.1))
    sums["optimizer"] += 4 * steps
    return sums


def estimated(run_dir: Path, world: int) -> dict[str, float]:
    """The planner's estimate of one rank's params, grads and optimizer state (the fit check's)."""
    run = schema.load(run_dir / "config.yaml")
    model = model_config(run.model, Path(run.data.dir))
    dims = plan_layout(run.strategy, run.parallel, model, world, world)
    est = estimate(model, run.train, run.strategy, dims, run.train.micro_batches(dims.dp)[0])
    return {part: getattr(est, part) for part in EXACT}


@pytest.mark.parametrize("name", [*CASES, *BF16_CASES])
def test_each_rank_records_exactly_the_state_its_layout_holds_and_the_estimate_is_its_largest(
        name, tmp_path_factory, data_overrides):
    run_dir = run(name, tmp_path_factory, data_overrides)
    records = [read_metrics(run_dir, rank, kind="memory") for rank in range(ranks(name))]
    assert all(len(r) == 1 and r[0]["step"] == 1 for r in records), records
    held = {part: sum(r[0][f"mem/{part}_gib"] * GIB for r in records) for part in EXACT}
    assert held == exact_sums(run_dir, ranks(name))
    # the fit check plans for the rank holding the most (a tensor-parallel rank's replicated norms, a pipeline's
    # tied embedding on two stages): within 1% of it (FSDP's uneven shards, the optimizer's step counts), or above
    # it where the estimate counts ZeRO-1's whole gradients before they are reduced into their partitions
    largest = {part: max(r[0][f"mem/{part}_gib"] * GIB for r in records) for part in EXACT}
    est = estimated(run_dir, ranks(name))
    assert est["params"] == pytest.approx(largest["params"], rel=0.01), (est, largest)
    assert all(est[part] >= 0.99 * largest[part] for part in EXACT), (est, largest)
