"""On a GPU, reading a device tensor on the host (`.item()`, `.tolist()`, `float(t)`, `bool(t)`, `int(t)`) waits
for the device to finish everything queued before it: a step that does so stops the CPU from running ahead, and the
device idles while the next step's kernels are launched. Such reads belong to log steps only. Counted here on CPU
with a TorchFunctionMode, which sees every one of them whatever the device, for each layout a GPU run uses."""
from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers import SHAKESPEARE, plan, spawn_ranks
from gpt.collectives.process_group import DistEnv, init_process_group, leave
from gpt.config import schema
from gpt.train.trainer import Trainer

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}
# tensors that are host tensors on every device: the step's flags travel on a gloo group of their own
HOST_SIDE = ("gpt/train/step_flags.py", "gpt/collectives/flag_sum.py")
BASE = ["model=tiny", "train.max_steps=12", "train.log_interval=4", "train.eval_interval=0", "train.progress=false",
        f"data.text_path={SHAKESPEARE}", "checkpoint.interval_steps=0", "train.warmup_steps=2"]


class HostReads(TorchFunctionMode):
    """Every host read of a tensor, with where it was made."""

    def __init__(self, found: list[str]):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            where = traceback.extract_stack(limit=3)[0]
            if not where.filename.endswith(HOST_SIDE):
                self.found.append(f"{func.__name__} at {where.filename}:{where.lineno}")
        return func(*args, **(kwargs or {}))


def reads_per_step(run_dir, env: DistEnv) -> dict[int, list[str]]:
    found: dict[int, list[str]] = collections.defaultdict(list)
    step = Trainer.train_step

    def counted(self):
        with HostReads(found[self.step]):
            return step(self)

    Trainer.train_step = counted  # in this process only: a rank's, or the test's (put back by the caller)
    try:
        Trainer(schema.load(run_dir / "config.yaml"), env, run_dir).fit()
    finally:
        Trainer.train_step = step
    return dict(found)


def _rank(rank: int, world: int, port: int, out) -> None:
    torch.set_num_threads(1)
    env = DistEnv(rank=rank, world_size=world, master_addr="127.0.0.1", master_port=port, hostname=f"h{rank}")
    init_process_group(env, torch.device("cpu"))
    out[rank] = reads_per_step(out["run_dir"], env)
    leave()


LAYOUTS = {"single": ["strategy=single"],
           "clipped-accumulated": ["strategy=single", "train.grad_clip=1.0", "train.micro_batch_size=2",
                                   "train.global_batch_size=8"],
           "ddp-2-ranks": ["strategy=ddp", "train.grad_clip=1.0", "cluster.tasks_per_node=2"],
           "fsdp-2-ranks": ["strategy=fsdp", "train.grad_clip=1.0", "cluster.tasks_per_node=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_host_read_on_a_step_that_logs_nothing(tmp_path, layout):
    run_dir = plan(tmp_path / "run", *BASE, f"data.dir={tmp_path / 'data'}", *LAYOUTS[layout])
    world = 2 if "2-ranks" in layout else 1
    if world == 1:
        found = reads_per_step(run_dir, DistEnv())
    else:
        found = spawn_ranks(_rank, world, {"run_dir": run_dir})[1]  # a rank other than 0: no logging of its own
    logged = {3, 7, 11}
    assert sorted(found) == list(range(12))
    quiet = {step: reads for step, reads in found.items() if step not in logged and reads}
    assert not quiet, quiet
    assert all(found[step] for step in logged)  # the log steps read the loss: the mode sees host reads
