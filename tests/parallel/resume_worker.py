"""One rank of the resume test (started by torch.distributed.run): for each strategy, train 20 steps with a
checkpoint at step 10, then a fresh trainer loads that checkpoint through the strategy and trains steps 10-19 again.

    python -m torch.distributed.run --nproc-per-node 2 resume_worker.py OUT_DIR DATA_DIR STRATEGY_OVERRIDES_JSON
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

from gpt.distributed import init_process_group, leave, pick_device  # noqa: E402
from gpt.trainer import Trainer  # noqa: E402
from launch.environment import detect  # noqa: E402


def main() -> None:
    out, data_dir, cases = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    common = json.loads(sys.argv[4])
    env = detect()
    device = pick_device("cpu", env)
    init_process_group(env, device)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        for name, overrides in cases.items():
            cfg = compose("config", overrides=[*common, *overrides, f"data.dir={data_dir}", "train.device=cpu",
                                               "checkpoint.interval_steps=10"])
            full = Trainer(cfg, env, out / name / "full")
            full.fit()
            resumed = Trainer(cfg, env, out / name / "resumed")
            resumed.checkpointer.load(out / name / "full" / "checkpoints" / "step_00000010", resumed.strategy)
            resumed.step = 10
            resumed.fit()
    leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skips gloo's racy teardown


if __name__ == "__main__":
    main()
