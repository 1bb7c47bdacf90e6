"""A DeepSpeed save other than the run's last gathers nothing onto rank 0: its weights stay in the engine's
partitions, which every rank writes, and the readers (gpt.checkpoint.writer.load_model: export, evaluation,
generation) put them together in one process, giving the weights the last save gathers whole."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gpt.config.model import ModelConfig
from gpt.model.transformer import GPT
from helpers import spawn_ranks

pytestmark = pytest.mark.slow  # two processes that import DeepSpeed

MODEL = dict(name="tiny", n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=50)


def _saves(rank: int, world: int, port: int, out) -> None:
    """Each rank trains a step, saves it as an interval save and again as the run's last, counting the gathers of
    a full parameter each made; rank 0 then reads both checkpoints as gpt.generate does."""
    import os
    from datetime import timedelta
    from pathlib import Path

    import deepspeed.utils
    import torch.distributed as dist

    from gpt.checkpoint.engine_weights import needs_engine
    from gpt.checkpoint.writer import Checkpointer, load_model
    from gpt.collectives.process_group import DistEnv
    from gpt.config.strategy import StrategyConfig
    from gpt.parallel.deepspeed import DeepSpeed
    from gpt.parallel.layout import ParallelDims

    os.environ["LOCAL_RANK"] = str(rank)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    gathers = []
    gather = deepspeed.utils.safe_get_full_fp32_param
    deepspeed.utils.safe_get_full_fp32_param = lambda p: gathers.append(1) or gather(p)
    torch.manual_seed(0)
    cfg = ModelConfig(**MODEL)
    strategy = DeepSpeed(StrategyConfig(name="deepspeed", stage=out["stage"]), DistEnv(rank=rank, world_size=world),
                         torch.device("cpu"), out["precision"], ParallelDims(dp_replicate=world))
    model = GPT(cfg)
    initial = model.wte.weight.detach().clone()
    strategy.setup(model, 1e-2, 0.1, (0.9, 0.95))
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(rank))
    strategy.train_step([(x, x)], 1, 1e-2, 1.0)
    checkpointer = Checkpointer(Path(out["root"]), is_main=rank == 0, rank=rank)
    meta = {"model": dataclasses.asdict(cfg)}
    counts = []
    for step, last in ((1, False), (2, True)):
        checkpointer.save(step, strategy, meta, last=last)
        counts.append(len(gathers))
        gathers.clear()
    out[f"gathers{rank}"] = counts
    dist.destroy_process_group()  # the readers run in a process of their own
    if rank == 0:
        interval, final = (Path(out["root"]) / f"step_0000000{s}" for s in (1, 2))
        out["needs_engine"] = [needs_engine(interval), needs_engine(final)]
        read = [load_model(p)[0].state_dict() for p in (interval, final)]
        out["same"] = all(torch.equal(v, read[1][k]) for k, v in read[0].items()) and read[0].keys() == read[1].keys()
        out["trained"] = not torch.equal(read[0]["wte.weight"], initial)


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "bf16"), (3, "fp32")])
def test_an_interval_save_gathers_nothing_and_reads_as_the_last_save(stage, precision, tmp_path):
    n_params = len(list(GPT(ModelConfig(**MODEL)).parameters()))  # a tied tensor once
    out = spawn_ranks(_saves, 2, {"stage": stage, "precision": precision, "root": str(tmp_path)})
    assert out["gathers0"] == out["gathers1"] == [0, n_params]  # the last save alone gathers, each parameter once
    assert out["needs_engine"] == [True, False]  # the interval save's weights are in the engine's files alone
    assert out["same"] and out["trained"]
