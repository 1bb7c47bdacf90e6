"""One rank of the collective-contract test (started by torch.distributed.run under TORCH_DISTRIBUTED_DEBUG=DETAIL,
which wraps every process group in torch's ProcessGroupWrapper: before each collective the ranks check, over a gloo
group of its own, that they all issue the same operation, with the same sequence number, tensor shapes, dtypes and
device types, and raise on every rank where one differs). For each strategy: the preflight, a run stopped by a
preemption signal that one rank gets (the ranks agree through the step flags' side group, and save), with an
evaluation and a checkpoint every 2 steps, then a fresh trainer that resumes from its checkpoint to the last step.
Every collective is also refused where it hands a tensor put on the host on purpose to a group that NCCL alone
would serve on GPUs (tests/cuda_standin.py NcclGroups).

    python -m torch.distributed.run --nproc-per-node N contract_worker.py OUT_DIR DATA_DIR CASES_JSON COMMON_JSON
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from cuda_standin import NcclGroups  # noqa: E402

from launch import launch_config  # noqa: E402
from gpt.collectives.process_group import init_process_group, leave, pick_device, preflight  # noqa: E402
from gpt.resilience.preemption import PreemptionFlag  # noqa: E402
from gpt.train.trainer import Trainer  # noqa: E402
from launch.rank.environment import detect  # noqa: E402


STOP_AT = 3  # rank 1 alone gets a preemption signal before this step: every rank stops and saves


def spare_ddp_logger() -> None:
    """DDP's construction log takes a gloo group for ProcessGroupGloo (a static_cast on its backend) to read its
    thread count: on the wrapper that DETAIL puts around it, the process segfaults (torch 2.13). The log is for
    humans; everything else of DDP runs as it does."""
    import torch.distributed as dist

    class Logger(dist.Logger):
        def set_construction_data_and_log(self, *args, **kwargs) -> None:
            pass

    dist.Logger = Logger


def main() -> None:
    out, data_dir, cases, common = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    assert os.environ.get("TORCH_DISTRIBUTED_DEBUG") == "DETAIL"
    spare_ddp_logger()
    NcclGroups().install(pytest.MonkeyPatch())  # a host tensor on a group NCCL alone would serve raises
    env = detect()
    device = pick_device("cpu", env)
    preflight(init_process_group(env, device), device, numel=1024, repeats=1)
    flag = PreemptionFlag()
    launch_config.register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        for name, overrides in cases.items():
            base = [*common, *overrides, f"data.dir={data_dir}", "train.device=cpu"]
            stopped = launch_config.parse(compose("config", overrides=[*base, f"debug.signal_at_step={STOP_AT}",
                                                                     "debug.signal_rank=1"]))
            summary = Trainer(stopped, env, out / name).fit()
            assert summary.last_step == STOP_AT, summary
            flag.received = None
            resumed = Trainer(launch_config.parse(compose("config", overrides=base)), env, out / name)
            assert resumed.step == STOP_AT, resumed.step
            resumed.fit()
            (out / name / f"done_rank{env.rank}").write_text(str(resumed.step))
    leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skips gloo's racy teardown


if __name__ == "__main__":
    main()
