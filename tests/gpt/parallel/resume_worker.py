"""One rank of the resume test (started by torch.distributed.run): for each strategy, train 20 steps without
interruption; then the same run again in another folder, stopped by a preemption signal that ONE rank (rank 1)
sends itself before step 7 (every rank must stop and save at step 7), and resumed by a fresh trainer with
resume=auto in that folder, which trains steps 7-19. The test compares the two folders' losses bitwise.

    python -m torch.distributed.run --nproc-per-node 2 resume_worker.py OUT_DIR DATA_DIR CASES_JSON COMMON_JSON
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

from launch import launch_config  # noqa: E402
from gpt.collectives.process_group import init_process_group, leave, pick_device  # noqa: E402
from gpt.resilience.preemption import PreemptionFlag  # noqa: E402
from gpt.train.trainer import Trainer  # noqa: E402
from launch.rank.environment import detect  # noqa: E402

STOP_AT = 7
STAGED: list[int] = []  # bytes of tensors each asynchronous save copied on this rank


def count_staged() -> None:
    """Record what every staging copy is given (DCP's copier, under any stager)."""
    from torch.distributed.checkpoint._state_dict_stager import StateDictStager
    from torch.distributed.tensor import DTensor

    copy = StateDictStager.stage

    def stage(self, state_dict, non_blocking=False):
        values = [v for section in state_dict.values() for v in section.values()]
        STAGED.append(sum((v.to_local() if isinstance(v, DTensor) else v).nbytes for v in values
                          if hasattr(v, "nbytes")))
        return copy(self, state_dict, non_blocking)

    StateDictStager.stage = stage


def main() -> None:
    out, data_dir, cases = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    common = json.loads(sys.argv[4])
    env = detect()
    device = pick_device("cpu", env)
    init_process_group(env, device)
    flag = PreemptionFlag()
    count_staged()
    launch_config.register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        for name, overrides in cases.items():
            base = [*common, *overrides, f"data.dir={data_dir}", "train.device=cpu", "checkpoint.interval_steps=5"]
            STAGED.clear()
            Trainer(launch_config.parse(compose("config", overrides=base)), env, out / name / "full").fit()
            (out / name / f"staged_rank{env.rank}.json").write_text(json.dumps(STAGED))
            stopped = launch_config.parse(compose("config", overrides=[*base, f"debug.signal_at_step={STOP_AT}",
                                                                     "debug.signal_rank=1"]))
            summary = Trainer(stopped, env, out / name / "stopped").fit()
            assert summary.preempted == "SIGUSR2", summary  # rank 1's signal, named on every rank
            assert summary.last_step == STOP_AT, summary
            flag.received = None
            resumed = Trainer(launch_config.parse(compose("config", overrides=base)), env, out / name / "stopped")
            assert resumed.step == STOP_AT, resumed.step
            resumed.fit()
    leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skips gloo's racy teardown


if __name__ == "__main__":
    main()
